"""The consumer side of the real enclave daemon: caps, concurrency, failures, hostile peers."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs

from drm_enclave import model_host
from drm_enclave.consumer_server import ConsumerLimits
from drm_lab.models import SECRET_NODE_NAME, failing_model
from drm_wire.errors import ErrorCode, PeerError
from drm_wire.framing import encode_frame
from drm_wire.messages import (
    EnclaveState,
    Error,
    Hello,
    InferenceResult,
    Message,
    PeerRole,
    Refusal,
    UsageReport,
    Waiting,
)
from drm_wire.net.channel import ChannelError
from drm_wire.net.ratls_context import consumer_client_context
from drm_wire.net.tls import open_tls_client
from drm_wire.protocol import Closed, Connection, Link, NeedData, Side
from tests.enclave.enclave_fakes import (
    HOST,
    TIMEOUT,
    FakeConsumer,
    Rig,
    running_enclave,
    tiny_input,
)


async def test_many_requests_in_flight_on_one_connection(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=10)
        async with rig.consumer() as consumer:
            results: list[InferenceResult] = []

            async def one() -> None:
                results.append(await consumer.infer(wait=None))

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(one)
            assert len(results) == 10
            assert rig.runtime.quota.served_total == 10
            assert rig.runtime.quota.available == 0
            with pytest.raises(PeerError) as caught:
                await consumer.infer()
            assert caught.value.code is ErrorCode.NO_INFERENCES
        report = await session.next(UsageReport)
        assert 1 <= report.served_total <= 10


async def test_inline_answers_then_parked_requests_keep_their_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests answered on the fast path (a unit free, the model known fast) and those
    parked in tasks share one queue: the burst past the quota parks, and a grant serves
    the parked requests oldest first."""
    # Generous thresholds, so a loaded test machine cannot make a tiny run look slow.
    monkeypatch.setattr(model_host, "INLINE_FAST", 1.0)
    monkeypatch.setattr(model_host, "INLINE_BUDGET", 2.0)
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=3)
        async with rig.consumer() as consumer:
            await consumer.infer()  # measured: the tiny model runs inline from now on
            assert rig.runtime.models["tiny"].runs_inline(tiny_input())
            served: list[int] = []
            waiting: list[Waiting] = []
            parked = [trio.Event() for _ in range(6)]
            done = [trio.Event() for _ in range(6)]

            async def one(i: int) -> None:
                await consumer.infer(wait=None, waiting=waiting, parked=parked[i])
                served.append(i)
                done[i].set()

            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for i in range(6):
                        nursery.start_soon(one, i)
                        await trio.testing.wait_all_tasks_blocked()
                    for i in (0, 1):
                        await done[i].wait()  # a unit free: answered at once
                    for i in (2, 3, 4, 5):
                        await parked[i].wait()
                    assert sorted(served) == [0, 1]
                    await session.grant(2, 5)
                    await done[2].wait()
                    await done[3].wait()
                    assert sorted(served) == [0, 1, 2, 3]  # the two oldest parked went first
                    await session.grant(3, 7)
            assert sorted(served) == [0, 1, 2, 3, 4, 5]
            assert sorted(w.position for w in waiting) == [1, 2, 3, 4]
            assert rig.runtime.quota.served_total == 7


async def test_in_flight_cap_answers_busy(tmp_path: Path) -> None:
    limits = ConsumerLimits(max_in_flight=2)
    async with running_enclave(tmp_path, limits=limits) as rig:
        session = await rig.link()  # serving, nothing granted: requests park
        async with rig.consumer() as consumer:
            parked = [trio.Event(), trio.Event()]
            results: list[InferenceResult] = []

            async def waiter(event: trio.Event) -> None:
                results.append(await consumer.infer(wait=None, parked=event))

            async with trio.open_nursery() as nursery:
                for event in parked:
                    nursery.start_soon(waiter, event)
                    with trio.fail_after(TIMEOUT):
                        await event.wait()
                with pytest.raises(PeerError) as caught:
                    await consumer.infer(wait=None)
                assert caught.value.code is ErrorCode.BUSY
                await session.grant(2, 2)
            assert len(results) == 2


async def test_connection_cap_answers_busy(tmp_path: Path) -> None:
    """At the cap with no connection idle (the first has a request parked), a new
    connection is refused with ``busy`` and the admitted one is undisturbed."""
    limits = ConsumerLimits(max_connections=1)
    async with running_enclave(tmp_path, limits=limits) as rig, rig.consumer() as first:
        session = await rig.link()
        parked = trio.Event()
        async with trio.open_nursery() as nursery:

            async def park() -> None:
                await first.infer(wait=None, parked=parked)

            nursery.start_soon(park)
            with trio.fail_after(TIMEOUT):
                await parked.wait()
            with pytest.raises(PeerError) as caught:
                async with rig.consumer():
                    pass
            assert caught.value.code is ErrorCode.BUSY
            # The refused connection did not disturb the admitted one.
            assert (await first.info()).state is not EnclaveState.BLOCKED
            await session.grant(1, 1)  # the parked request is served
        assert rig.runtime.quota.served_total == 1


async def test_an_idle_connection_makes_room_for_a_new_one(tmp_path: Path) -> None:
    """I17: connection slots cannot be held by idling. At the cap, the connection idle the
    longest is told ``busy`` and closed, and the newcomer is served."""
    limits = ConsumerLimits(max_connections=2)
    with capture_logs() as logs:
        async with running_enclave(tmp_path, limits=limits) as rig:
            await rig.link(granted_total=5)
            async with rig.consumer() as oldest, rig.consumer() as recent:
                await oldest.infer()
                await recent.infer()  # the more recently active of the two
                async with rig.consumer() as newcomer:
                    assert (await newcomer.infer()).inferences_left == 2
                    with pytest.raises(PeerError) as caught:
                        await oldest.info()
                    assert caught.value.code is ErrorCode.BUSY
                    assert (await recent.info()).inferences_left == 2
    closed = [e for e in logs if e["event"] == "consumer_idle_connection_closed"]
    assert len(closed) == 1


async def test_handshakes_in_progress_are_capped(tmp_path: Path) -> None:
    """I17: with one handshake slot, of three peers that never start their handshake one
    holds the slot and the others wait for it; the third's wait cannot end within the
    handshake timeout, so it is closed (and logged). (The second may give up too, when
    its deadline comes before the first's timeout is served.) A consumer is served
    afterwards."""
    limits = ConsumerLimits(max_handshakes=1, handshake_timeout=2.0)
    with capture_logs() as logs:
        async with running_enclave(tmp_path, limits=limits) as rig:
            await rig.link(granted_total=1)
            silent = [await trio.open_tcp_stream(*rig.address) for _ in range(3)]

            async def until_closed(stream: trio.SocketStream) -> None:
                while await stream.receive_some():
                    pass

            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for stream in silent:
                        nursery.start_soon(until_closed, stream)
            for stream in silent:
                await stream.aclose()
            async with rig.consumer() as consumer:
                await consumer.infer()
    full = [e for e in logs if e["event"] == "consumer_handshake_slots_full"]
    assert 1 <= len(full) <= 2
    assert full[0]["max_handshakes"] == 1


async def test_consumer_leaving_returns_its_parked_unit(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link()
        parked = trio.Event()
        async with rig.consumer() as consumer, trio.open_nursery() as nursery:

            async def park() -> None:
                await consumer.infer(wait=None, parked=parked)

            nursery.start_soon(park)
            with trio.fail_after(TIMEOUT):
                await parked.wait()
            nursery.cancel_scope.cancel()
        await session.grant(1, 1)
        async with rig.consumer() as other:
            result = await other.infer(wait=5.0)
        assert result.inferences_left == 0
        assert rig.runtime.quota.served_total == 1


async def test_failed_inference_costs_nothing_and_leaks_no_node_name(tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with running_enclave(tmp_path) as rig:
            await rig.link(granted_total=1, model=failing_model())
            async with rig.consumer() as consumer:
                with pytest.raises(PeerError) as caught:
                    await consumer.infer()
                assert caught.value.code is ErrorCode.INFERENCE_FAILED
                assert SECRET_NODE_NAME not in str(caught.value)
                assert rig.runtime.quota.available == 1
                assert rig.runtime.quota.served_total == 0
    assert SECRET_NODE_NAME not in repr(logs)


async def test_garbage_from_a_peer_does_not_hurt_others(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        await rig.link(granted_total=1)
        raw = await trio.open_tcp_stream(HOST, rig.address[1])
        await raw.send_all(b"\x16\x03\x01\x00\x05hello, this is not TLS" * 10)
        await raw.aclose()
        async with rig.consumer() as consumer:
            assert (await consumer.infer()).inferences_left == 0


async def test_protocol_violation_closes_only_that_connection(tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with running_enclave(tmp_path) as rig:
            await rig.link(granted_total=1)
            async with rig.consumer() as rude, rig.consumer() as polite:
                # A second hello is not allowed once the connection is open: written as a
                # raw frame, past the client's own state machine.
                header, payload = Hello(
                    versions=(3,), role=PeerRole.CONSUMER, software="rude"
                ).to_wire()
                for buffer in encode_frame(header, payload):
                    await rude.channel.stream.send_all(buffer)
                with pytest.raises((PeerError, ChannelError)):
                    await rude.info()
                assert (await polite.infer()).inferences_left == 0
    assert not any(entry["event"] == "consumer_connection_crashed" for entry in logs)
    ended = [entry for entry in logs if entry["event"] == "consumer_disconnected"]
    assert any("RemoteProtocolError" in entry["reason"] for entry in ended)


async def _answer_to_raw_hello(rig: Rig, hello: bytes | Hello) -> Message | Closed:
    """Send ``hello`` (raw bytes, or a message past our own checks) first after the TLS
    handshake; return what the enclave answers."""
    stream = await open_tls_client(HOST, rig.address[1], consumer_client_context(rig.policy))
    conn = Connection(Link.CONSUMER, Side.CLIENT)
    data = hello if isinstance(hello, bytes) else b"".join(conn.send(hello))
    with trio.fail_after(TIMEOUT):
        await stream.send_all(data)
        while isinstance(event := conn.next_message(), NeedData):
            conn.receive_data(await stream.receive_some())
    await trio.aclose_forcefully(stream)
    assert not isinstance(event, NeedData)
    return event


# Found by fuzzing (tests/fuzz): a hello whose versions is the int 0 (before the fix, a
# TypeError: no error frame, and the connection logged as a crash).
HELLO_WITH_INT_VERSIONS = bytes.fromhex(
    "0000002684a474797065a568656c6c6fa876657273696f6e7300a4726f6c6500a8736f66747761726500"
)


@pytest.mark.parametrize(
    ("hello", "code", "text"),
    [
        (HELLO_WITH_INT_VERSIONS, ErrorCode.PROTOCOL_ERROR, "versions: must be a list"),
        (
            Hello(versions=(99,), role=PeerRole.CONSUMER, software="future"),
            ErrorCode.UNSUPPORTED_VERSION,
            "no protocol version we do",
        ),
    ],
    ids=["versions-int", "unsupported-version"],
)
async def test_a_bad_hello_is_answered_and_logged_as_the_peers_fault(
    tmp_path: Path, hello: bytes | Hello, code: ErrorCode, text: str
) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with running_enclave(tmp_path) as rig:
            await rig.link(granted_total=1)
            answer = await _answer_to_raw_hello(rig, hello)
            assert isinstance(answer, Refusal | Error)  # refused as the protocol says
            assert answer.code is code
            async with rig.consumer() as polite:  # and the enclave serves on
                assert (await polite.infer()).inferences_left == 0
    assert not [entry for entry in logs if entry["event"] == "consumer_connection_crashed"]
    (warning,) = [entry for entry in logs if entry["event"] == "consumer_protocol_error"]
    assert warning["log_level"] == "warning"
    assert warning["code"] == code.value
    assert text in warning["error"]
    assert warning["peer"].startswith(f"{HOST}:")


async def test_a_client_flooding_from_many_connections_is_served_in_turn(tmp_path: Path) -> None:
    """R09 over real TLS sockets: one client (127.0.0.1) parks 4 x 16 requests from four
    connections; a second client (127.0.0.2) parks one later and is told it is second in
    line, and the second unit granted is its: not the 65th."""
    async with running_enclave(tmp_path) as rig:
        session = await rig.link()  # serving, nothing granted: requests park
        served_send, served = trio.open_memory_channel[str](100)
        async with contextlib.AsyncExitStack() as stack:
            flood = [await stack.enter_async_context(rig.consumer()) for _ in range(4)]
            honest = await stack.enter_async_context(rig.consumer(local_address="127.0.0.2"))
            async with trio.open_nursery() as nursery:

                async def one(consumer: FakeConsumer, who: str, parked: trio.Event) -> None:
                    waiting: list[Waiting] = []
                    await consumer.infer(wait=None, parked=parked, waiting=waiting)
                    served_send.send_nowait(f"{who}@{waiting[0].position}")

                for consumer in flood:
                    for _ in range(16):
                        parked = trio.Event()
                        nursery.start_soon(one, consumer, "flood", parked)
                        with trio.fail_after(TIMEOUT):
                            await parked.wait()
                parked = trio.Event()
                nursery.start_soon(one, honest, "honest", parked)
                with trio.fail_after(TIMEOUT):
                    await parked.wait()
                quota = rig.runtime.quota
                assert (quota.parked, quota.parked_clients) == (65, 2)
                with trio.fail_after(TIMEOUT):
                    await session.grant(1, 1)
                    assert (await served.receive()).startswith("flood@")
                    await session.grant(1, 2)
                    assert await served.receive() == "honest@2"
                assert (quota.parked, quota.served_total) == (63, 2)
                nursery.cancel_scope.cancel()

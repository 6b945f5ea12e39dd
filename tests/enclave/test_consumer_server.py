"""The consumer side of the real enclave daemon: caps, concurrency, failures, hostile peers."""

from __future__ import annotations

from pathlib import Path

import pytest
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
    Hello,
    InferenceResult,
    PeerRole,
    UsageReport,
    Waiting,
)
from drm_wire.net.channel import ChannelError
from tests.enclave.enclave_fakes import HOST, TIMEOUT, running_enclave, tiny_input


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
    limits = ConsumerLimits(max_connections=1)
    async with running_enclave(tmp_path, limits=limits) as rig, rig.consumer() as first:
        with pytest.raises(PeerError) as caught:
            async with rig.consumer():
                pass
        assert caught.value.code is ErrorCode.BUSY
        # The refused connection did not disturb the admitted one.
        assert (await first.info()).state is not EnclaveState.BLOCKED


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
                    versions=(2,), role=PeerRole.CONSUMER, software="rude"
                ).to_wire()
                for buffer in encode_frame(header, payload):
                    await rude.channel.stream.send_all(buffer)
                with pytest.raises((PeerError, ChannelError)):
                    await rude.info()
                assert (await polite.infer()).inferences_left == 0
    assert not any(entry["event"] == "consumer_connection_crashed" for entry in logs)
    ended = [entry for entry in logs if entry["event"] == "consumer_disconnected"]
    assert any("RemoteProtocolError" in entry["reason"] for entry in ended)

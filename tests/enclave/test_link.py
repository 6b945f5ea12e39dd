"""The real enclave daemon against a fake custodian: models, grants, reports, kill switch.

Every test runs ``drm_enclave.serve.serve`` in-process over loopback RA-TLS, with a fake
custodian (``enclave_fakes.FakeCustodian``) the test drives message by message and a fake
consumer. Nothing sleeps: the tests wait on messages or on the runtime's state.
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import trio
from structlog.testing import capture_logs

from drm_lab.models import tiny_model
from drm_wire.errors import ErrorCode, PeerError
from drm_wire.messages import (
    Block,
    BlockAck,
    Demand,
    EnclaveState,
    Error,
    Heartbeat,
    ModelBegin,
    ModelChunk,
    ModelEnd,
    ModelLoaded,
    UsageReport,
    Waiting,
)
from drm_wire.tensors import Tensor
from tests.enclave.enclave_fakes import (
    FAST_TIMING,
    LICENSE,
    TIMEOUT,
    FakeSession,
    M,
    fail_a_parked_request,
    make_pki,
    running_enclave,
)


async def test_model_delivered_then_grant_means_serving(tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with running_enclave(tmp_path) as rig, rig.consumer() as consumer:
            info = await consumer.info()  # the link may or may not be up yet
            assert info.state in {EnclaveState.CUSTODIAN_UNREACHABLE, EnclaveState.LOADING}
            with pytest.raises(PeerError) as caught:
                await consumer.infer()
            assert caught.value.code is ErrorCode.CUSTODIAN_UNREACHABLE

            session = await rig.link(granted_total=3)
            assert session.hello.license == f"{LICENSE.license_id}:{LICENSE.secret}"
            assert session.hello.instance_id is not None
            assert len(session.hello.instance_id) == 32
            info = await consumer.info()
            assert info.state is EnclaveState.SERVING
            assert info.inferences_left == 3
            (model,) = info.models
            assert model.name == "tiny"
            assert [spec.name for spec in model.inputs] == ["x"]
            result = await consumer.infer()
            assert result.inferences_left == 2
            assert result.outputs[0].shape == (1, 3)
    events = [entry["event"] for entry in logs]
    assert "enclave_serving" in events
    assert "custodian_link_up" in events
    serving = next(entry for entry in logs if entry["event"] == "enclave_serving")
    assert serving["simulated"] is True
    assert serving["consumer_address"] == f"{rig.address[0]}:{rig.address[1]}"
    # The license secret is never logged.
    assert not any(LICENSE.secret in repr(entry) for entry in logs)


async def test_grants_bound_inferences_and_park_until_the_next_grant(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=2)
        async with rig.consumer() as consumer:
            for left in (1, 0):
                assert (await consumer.infer()).inferences_left == left
            report = await session.next(UsageReport)
            assert report.served_total >= 1
            # Nothing left: wait=0 fails at once, and costs nothing.
            with pytest.raises(PeerError) as caught:
                await consumer.infer(wait=0.0)
            assert caught.value.code is ErrorCode.NO_INFERENCES
            # The third request parks and is told so; a grant wakes it.
            waiting: list[Waiting] = []
            parked = trio.Event()
            results = []

            async def third() -> None:
                results.append(await consumer.infer(wait=None, waiting=waiting, parked=parked))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(third)
                with trio.fail_after(TIMEOUT):
                    await parked.wait()
                assert waiting[0].position == 1
                assert rig.runtime.quota.parked == 1
                await session.grant(1, 3)
            assert results[0].inferences_left == 0
            assert rig.runtime.quota.served_total == 3
            assert rig.runtime.quota.granted_total == 3


async def test_usage_reports_are_cumulative_and_acks_applied(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=5)
        async with rig.consumer() as consumer:
            await consumer.infer()
            first = await session.next(UsageReport)
            assert (first.seq, first.served_total) == (1, 1)
            # One report in flight: more inferences are batched into the next one.
            await consumer.infer()
            await consumer.infer()
            await session.ack(first.seq, first.served_total)
            second = await session.next(UsageReport)
            assert (second.seq, second.served_total) == (2, 3)
            await session.ack(second.seq, second.served_total)
            with trio.fail_after(TIMEOUT):
                await rig.runtime.wait_for(lambda r: r.accounting.acked_total == 3)
            assert rig.runtime.accounting.unreported == 0


async def test_reports_wait_a_period_unless_the_custodian_needs_one(tmp_path: Path) -> None:
    period = 1.0
    timing = dataclasses.replace(FAST_TIMING, report_period=period)
    async with running_enclave(tmp_path, timing=timing) as rig:
        session = await rig.link(granted_total=20)
        async with rig.consumer() as consumer:
            await consumer.infer()
            first = await session.next(UsageReport)  # the first after a quiet spell: at once
            sent_first = trio.current_time()
            await session.ack(first.seq, first.served_total)
            await consumer.infer()
            await consumer.infer()
            second = await session.next(UsageReport)
            # Not before the period (less the first report's delivery time), carrying both
            # inferences served meanwhile.
            assert trio.current_time() - sent_first >= period / 2
            assert (second.seq, second.served_total) == (2, 3)
            await session.ack(second.seq, second.served_total)
            sent_second = trio.current_time()
            for _ in range(9):  # 9 of the 17 outstanding: more than half
                await consumer.infer()
            third = await session.next(UsageReport)  # urgent: long before the period
            assert trio.current_time() - sent_second < period / 2
            assert (third.seq, third.served_total) == (3, 12)


async def test_bad_input_is_refused_before_any_quota(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        await rig.link(granted_total=1)
        async with rig.consumer() as consumer:
            bad = (Tensor.from_numpy("x", np.zeros((1, 5), dtype=np.float32)),)
            with pytest.raises(PeerError) as caught:
                await consumer.infer(bad)
            assert caught.value.code is ErrorCode.BAD_REQUEST
            wrong_name = (Tensor.from_numpy("z", np.zeros((1, 4), dtype=np.float32)),)
            with pytest.raises(PeerError) as caught:
                await consumer.infer(wrong_name)
            assert caught.value.code is ErrorCode.BAD_REQUEST
            with pytest.raises(PeerError) as caught:
                await consumer.infer(model="nope")
            assert caught.value.code is ErrorCode.MODEL_NOT_FOUND
            assert rig.runtime.quota.available == 1
            assert rig.runtime.quota.served_total == 0
            assert (await consumer.infer()).inferences_left == 0


async def test_custodian_gone_fails_parked_and_new_requests_at_once(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=1)
        async with rig.consumer() as consumer:
            await consumer.infer()
            error = await fail_a_parked_request(consumer, session.close)
            assert error.code is ErrorCode.CUSTODIAN_UNREACHABLE
            with pytest.raises(PeerError) as caught:
                await consumer.infer(wait=None)
            assert caught.value.code is ErrorCode.CUSTODIAN_UNREACHABLE
            assert (await consumer.info()).state is not EnclaveState.SERVING


async def test_reconnect_resyncs_without_double_counting(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=3)
        model_before = rig.runtime.models["tiny"]
        async with rig.consumer() as consumer:
            await consumer.infer()
            report = await session.next(UsageReport)
            assert report.served_total == 1
            session.close()  # the report is never acknowledged
            await rig.wait_state(EnclaveState.CUSTODIAN_UNREACHABLE)

            second = await rig.custodian.session()
            assert second.hello.instance_id == session.hello.instance_id
            # The unacknowledged report is sent again on the new link, at once.
            resent = await second.next(UsageReport)
            assert resent.served_total == 1
            await second.send_model("tiny", _tiny())
            await second.next(ModelLoaded)
            # Still not serving: the grant re-sync has not come yet.
            assert rig.runtime.state is EnclaveState.LOADING
            with pytest.raises(PeerError) as caught:
                await consumer.infer()
            assert caught.value.code is ErrorCode.CUSTODIAN_UNREACHABLE
            await second.grant(3, 3)  # the same total again: adds nothing
            await rig.wait_state(EnclaveState.SERVING)
            assert rig.runtime.quota.available == 2
            assert rig.runtime.models["tiny"] is model_before  # same digest: session kept
            assert (await consumer.infer()).inferences_left == 1


async def test_block_and_unblock(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=1)
        async with rig.consumer() as consumer:
            await consumer.infer()
            error = await fail_a_parked_request(consumer, session.block)
            assert error.code is ErrorCode.BLOCKED
            assert (await consumer.info()).state is EnclaveState.BLOCKED
            # A grant while blocked is kept, but does not lift the block.
            await session.grant(1, 2)
            with trio.fail_after(TIMEOUT):
                await rig.runtime.wait_for(lambda r: r.quota.granted_total == 2)
            with pytest.raises(PeerError) as caught:
                await consumer.infer()
            assert caught.value.code is ErrorCode.BLOCKED
            await session.unblock()
            await rig.wait_state(EnclaveState.SERVING)
            assert (await consumer.infer()).inferences_left == 0


async def test_consumers_are_told_the_block_reason_and_what_to_do(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=1)
        async with rig.consumer() as consumer:
            await consumer.infer()  # none left: the next one parks

            async def block() -> None:
                await session.channel.send(Block(block_id=1, reason="unpaid invoice 42\x1b[2J"))

            parked = await fail_a_parked_request(consumer, block)
            with pytest.raises(PeerError) as caught:
                await consumer.infer()
            told = (
                "the model owner blocked this borrower (reason: unpaid invoice 42[2J); "
                "nothing is served until the owner unblocks it: ask the borrower's operator"
            )  # the escape character is dropped: the text goes to a consumer's terminal
            assert (parked.code, parked.detail) == (ErrorCode.BLOCKED, told)
            assert (caught.value.code, caught.value.detail) == (ErrorCode.BLOCKED, told)
            await session.unblock()
            await rig.wait_state(EnclaveState.SERVING)
            lost = await fail_a_parked_request(consumer, session.close)
            with pytest.raises(PeerError) as caught:
                await consumer.infer()
        for error in (lost, caught.value):
            assert error.code is ErrorCode.CUSTODIAN_UNREACHABLE
            assert error.detail == (
                "the enclave has no verified link to its custodian, so it serves nothing; it "
                "redials on its own: retry later, and if this lasts, tell the enclave's "
                "operator (its log says why)"
            )


async def test_block_on_resync_keeps_the_enclave_blocked(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.custodian.session()
        await session.send_model("tiny", _tiny())
        await session.next(ModelLoaded)
        await session.block()
        await rig.wait_state(EnclaveState.BLOCKED)
        async with rig.consumer() as consumer:
            with pytest.raises(PeerError) as caught:
                await consumer.infer()
            assert caught.value.code is ErrorCode.BLOCKED


async def test_silent_custodian_trips_the_kill_switch(tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with running_enclave(tmp_path) as rig:
            session = await rig.link(granted_total=1)
            session.heartbeats = False
            await rig.wait_state(EnclaveState.CUSTODIAN_UNREACHABLE)
            async with rig.consumer() as consumer:
                with pytest.raises(PeerError) as caught:
                    await consumer.infer()
                assert caught.value.code is ErrorCode.CUSTODIAN_UNREACHABLE
            # ... and it redials.
            await rig.custodian.session()
    failures = [entry for entry in logs if entry["event"] == "custodian_link_failed"]
    assert any(entry["error_type"] == "LinkLost" for entry in failures)


async def test_messages_keep_the_link_alive_past_the_deadline(tmp_path: Path) -> None:
    """The watchdog's deadline moves with every message: with the custodian's heartbeats
    flowing, three deadlines pass (timed by the enclave's own heartbeats) and the link
    stays up."""
    beats = round(3 * FAST_TIMING.dead_after / FAST_TIMING.heartbeat_interval)
    with capture_logs() as logs:
        async with running_enclave(tmp_path) as rig:
            session = await rig.link(granted_total=1)
            seen = 0
            with trio.fail_after(TIMEOUT):
                while seen < beats:
                    seen += isinstance(await session.channel.receive(), Heartbeat)
            assert rig.runtime.state is EnclaveState.SERVING
    assert not [entry for entry in logs if entry["event"] == "custodian_link_failed"]


async def test_enclave_sends_heartbeats(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.custodian.session()
        with trio.fail_after(TIMEOUT):
            message = await session.channel.receive()
        assert isinstance(message, Heartbeat)


async def test_untrusted_custodian_never_gets_a_hello(tmp_path: Path) -> None:
    impostor = make_pki("some other CA")
    async with running_enclave(tmp_path, custodian_pki=impostor) as rig:
        with trio.fail_after(TIMEOUT):
            while rig.custodian.handshake_failures < 2:  # it redials, and is refused again
                await rig.custodian.handshake_failed.wait()
                rig.custodian.handshake_failed = trio.Event()
        assert rig.custodian.hellos == 0
        assert rig.runtime.state is EnclaveState.CUSTODIAN_UNREACHABLE


async def test_a_custodian_certificate_for_another_name_never_gets_a_hello(
    tmp_path: Path,
) -> None:
    # The custodian's certificate names 127.0.0.1 only; the enclave dials it as
    # "localhost" (a misconfigured --custodian): same CA, same address, refused.
    async with running_enclave(tmp_path, custodian_host="localhost") as rig:
        with trio.fail_after(TIMEOUT):
            while rig.custodian.handshake_failures < 2:
                await rig.custodian.handshake_failed.wait()
                rig.custodian.handshake_failed = trio.Event()
        assert rig.custodian.hellos == 0
        assert rig.runtime.state is EnclaveState.CUSTODIAN_UNREACHABLE


async def test_bad_ack_drops_the_link(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=2)
        async with rig.consumer() as consumer:
            await consumer.infer()
            report = await session.next(UsageReport)
            await session.ack(report.seq, report.served_total + 1)  # a total never reported
            await rig.wait_state(EnclaveState.CUSTODIAN_UNREACHABLE)
            second = await rig.custodian.session()
            assert second.hello.instance_id == session.hello.instance_id


async def test_model_with_bad_digest_is_refused(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.custodian.session()
        data = _tiny()
        await session.channel.send(
            ModelBegin(name="tiny", size=len(data), sha256=hashlib.sha256(b"other").digest())
        )
        await session.channel.send(ModelChunk(offset=0, data=memoryview(data)))
        await session.channel.send(ModelEnd(name="tiny"))
        await rig.custodian.session()  # the link was dropped and the enclave redialled
        assert "tiny" not in rig.runtime.models


def _tiny() -> bytes:
    return tiny_model()


async def test_duplicate_instance_error_is_survived_by_redialling(tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with running_enclave(tmp_path) as rig:
            session = await rig.custodian.session()
            await session.channel.send(
                Error(code=ErrorCode.DUPLICATE_INSTANCE, message="another instance is live")
            )
            second = await rig.custodian.session()
            assert second.hello.instance_id == session.hello.instance_id
            assert rig.runtime.state is not EnclaveState.SERVING
    failures = [entry for entry in logs if entry["event"] == "custodian_link_failed"]
    assert any("duplicate_instance" in entry["error"] for entry in failures)


# --- version 4: the demand signal and the block acknowledgement ---------------------------


async def _next_acking_reports(session: FakeSession, kind: type[M]) -> M:
    """The next ``kind``, acknowledging the usage reports that come first (a demand
    follows a report of what was served before it)."""
    while True:
        message = await session.next(kind | UsageReport)  # type: ignore[arg-type]
        if isinstance(message, kind):
            return message
        assert isinstance(message, UsageReport)
        await session.ack(message.seq, message.served_total)


async def test_a_parked_request_sends_its_demand_after_a_report_and_a_grant_clears_it(
    tmp_path: Path,
) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=1)
        async with rig.consumer() as consumer:
            await consumer.infer()  # its one unit: the next request parks
            report = await session.next(UsageReport)
            await session.ack(report.seq, report.served_total)
            parked = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(consumer.infer, wait=None, parked=parked))
                with trio.fail_after(TIMEOUT):
                    await parked.wait()
                demand = await _next_acking_reports(session, Demand)
                assert (demand.units, demand.parked_requests, demand.granted_total) == (1, 1, 1)
                await session.grant(2, 3)  # covers it, with one to spare
            demand = await _next_acking_reports(session, Demand)
            assert (demand.units, demand.parked_requests, demand.granted_total) == (0, 0, 3)


async def test_a_block_is_acknowledged_once_nothing_can_start(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=1)
        async with rig.consumer() as consumer:
            await consumer.infer()
            parked_error = await fail_a_parked_request(consumer, session.block)
            ack = await _next_acking_reports(session, BlockAck)
            assert ack.block_id == session.block_ids == 1
            # By the acknowledgement the parked request had failed, and none starts.
            assert parked_error.code is ErrorCode.BLOCKED
            assert rig.runtime.quota.suspended is ErrorCode.BLOCKED
            with pytest.raises(PeerError) as caught:
                await consumer.infer()
            assert caught.value.code is ErrorCode.BLOCKED
            await session.unblock()
            await rig.wait_state(EnclaveState.SERVING)
            await session.block()
            assert (await _next_acking_reports(session, BlockAck)).block_id == 2

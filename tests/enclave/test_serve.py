"""``serve()`` set-up: bound address, refused configurations, the runtime's state rules."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from drm_enclave.custodian_link import LinkTiming, backoff_delay
from drm_enclave.quota import QuotaError
from drm_enclave.runtime import EnclaveRuntime
from drm_enclave.serve import serve
from drm_lab.models import tiny_model
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.errors import ConfigError, ErrorCode
from drm_wire.messages import (
    EnclaveState,
    Grant,
    ModelLoaded,
    ReturnAck,
    Returned,
    UsageReport,
)
from tests.enclave.enclave_fakes import (
    HOST,
    TIMEOUT,
    FakeCustodian,
    FakeSession,
    consumer,
    enclave_config,
    enclave_policy,
    fail_a_parked_request,
    shared_pki,
)


async def test_serve_reports_its_bound_port(tmp_path: Path) -> None:
    config = enclave_config(shared_pki(), 1, tmp_path / "sim")  # no custodian there
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(functools.partial(serve, config))
        assert host == HOST
        assert port > 0
        stream = await trio.open_tcp_stream(host, port)  # the consumer port is open
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_serve_refuses_a_leaf_pinned_as_ca(tmp_path: Path) -> None:
    pki = shared_pki()
    leaf_pem = pki.server_cert.public_bytes(serialization.Encoding.PEM)
    config = enclave_config(pki, 1, tmp_path / "sim", custodian_ca_pem=leaf_pem)
    with pytest.raises(ConfigError, match="not a CA"):
        await serve(config)


async def test_serve_refuses_garbage_as_ca(tmp_path: Path) -> None:
    config = enclave_config(shared_pki(), 1, tmp_path / "sim", custodian_ca_pem=b"junk")
    with pytest.raises(ConfigError):
        await serve(config)


async def test_serve_never_runs_unattested(tmp_path: Path) -> None:
    config = enclave_config(shared_pki(), 1, None, attestation="auto")
    with pytest.raises(ConfigError):
        await serve(config)


def test_backoff_is_capped_and_jittered() -> None:
    timing = LinkTiming(backoff_initial=0.1, backoff_max=5.0)
    delays = [backoff_delay(n, timing) for n in range(40)]
    assert all(0 < d <= 5.0 for d in delays)
    assert 0.05 <= delays[0] <= 0.1
    assert all(d >= 2.5 for d in delays[10:])


def test_runtime_starts_suspended_and_resumes_only_when_synced() -> None:
    runtime = EnclaveRuntime()
    assert _state(runtime) is EnclaveState.CUSTODIAN_UNREACHABLE
    assert runtime.quota.suspended is ErrorCode.CUSTODIAN_UNREACHABLE
    runtime.link_connected()
    assert _state(runtime) is EnclaveState.LOADING
    runtime.load_started()
    runtime.on_grant(Grant(grant_id=1, units=2, granted_total=2))
    assert _state(runtime) is EnclaveState.LOADING  # a load is still pending
    runtime.load_finished(None)
    assert _state(runtime) is EnclaveState.SERVING
    assert runtime.quota.available == 2
    # A replayed grant adds nothing; a big jump in the total is applied in full.
    assert runtime.on_grant(Grant(grant_id=2, units=2, granted_total=2)) == 0
    assert runtime.on_grant(Grant(grant_id=3, units=1, granted_total=2_000_002)) == 2_000_000
    assert runtime.quota.available == 2_000_002
    runtime.on_block()
    assert _state(runtime) is EnclaveState.BLOCKED
    runtime.link_lost()
    assert _state(runtime) is EnclaveState.CUSTODIAN_UNREACHABLE
    assert runtime.quota.suspended is ErrorCode.CUSTODIAN_UNREACHABLE


async def test_runtime_kill_switch_fails_new_requests() -> None:
    runtime = EnclaveRuntime()
    runtime.link_connected()
    runtime.on_unblock()
    assert _state(runtime) is EnclaveState.SERVING
    runtime.link_lost()
    with pytest.raises(QuotaError) as caught:
        await runtime.quota.acquire(None)
    assert caught.value.code is ErrorCode.CUSTODIAN_UNREACHABLE


def _state(runtime: EnclaveRuntime) -> EnclaveState:
    return runtime.state  # a call, so mypy does not narrow the property across steps


async def test_shutdown_drains_parked_requests_and_flushes_usage(tmp_path: Path) -> None:
    stop = trio.Event()
    stopped = trio.Event()
    pki = shared_pki()
    sim_dir = tmp_path / "sim"
    platform = SimulatedPlatform.create(sim_dir)
    policy = enclave_policy(pki, platform)
    custodian = FakeCustodian(pki, policy)
    runtime = EnclaveRuntime()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(custodian.serve)
        config = enclave_config(pki, port, sim_dir)

        async def run_enclave(*, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
            await serve(
                config, runtime=runtime, shutdown_trigger=stop.wait, task_status=task_status
            )
            stopped.set()

        address = await nursery.start(run_enclave)
        session = await custodian.session()
        await session.send_model("tiny", tiny_model())
        await session.next(ModelLoaded)
        await session.grant(2, 2)
        with trio.fail_after(TIMEOUT):
            await runtime.wait_for(lambda r: r.state is EnclaveState.SERVING)
        async with consumer(address, policy) as client:
            await client.infer()
            first = await session.next(UsageReport)  # left unacknowledged for now
            await client.infer()  # none left now: the next one parks...
            # ... and fails with a clear error when the daemon stops.
            error = await fail_a_parked_request(client, stop.set)
            assert error.code is ErrorCode.CUSTODIAN_UNREACHABLE
        # The daemon waits for the custodian to acknowledge everything it served.
        assert not stopped.is_set()
        await session.ack(first.seq, first.served_total)
        last = await session.next(UsageReport)
        assert last.served_total == 2
        await session.ack(last.seq, last.served_total)
        # Then its final return (nothing idle: both units were served), acknowledged.
        final = await session.next(Returned)
        assert (final.recall_id, final.returned_total, final.served_total, final.final) == (
            None,
            0,
            2,
            True,
        )
        assert not stopped.is_set()
        await session.channel.send(ReturnAck(recall_id=None, returned_total=0))
        with trio.fail_after(TIMEOUT):
            await stopped.wait()
        assert runtime.accounting.unreported == 0
        nursery.cancel_scope.cancel()


async def _serving(
    nursery: trio.Nursery,
    tmp_path: Path,
    runtime: EnclaveRuntime,
    stop: trio.Event,
    stopped: trio.Event,
    *,
    units: int,
) -> FakeSession:
    """An enclave under a fake custodian, serving ``units`` of one grant; it stops when
    ``stop`` is set and sets ``stopped`` once ``serve`` returns. The custodian's session."""
    pki = shared_pki()
    sim_dir = tmp_path / "sim"
    platform = SimulatedPlatform.create(sim_dir)
    custodian = FakeCustodian(pki, enclave_policy(pki, platform))
    port = await nursery.start(custodian.serve)
    config = enclave_config(pki, port, sim_dir)

    async def run_enclave(*, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        await serve(config, runtime=runtime, shutdown_trigger=stop.wait, task_status=task_status)
        stopped.set()

    await nursery.start(run_enclave)
    session = await custodian.session()
    await session.send_model("tiny", tiny_model())
    await session.next(ModelLoaded)
    await session.grant(units, units)
    with trio.fail_after(TIMEOUT):
        await runtime.wait_for(lambda r: r.state is EnclaveState.SERVING)
    return session


async def test_a_clean_stop_returns_idle_units_and_a_grant_that_crosses_it(
    tmp_path: Path,
) -> None:
    """SIGTERM with 5 units idle: the final return gives them back; a grant the custodian
    sent before it read that return is given back too, in a second final return; the
    daemon exits once the custodian has acknowledged both, and says nothing is in doubt."""
    stop, stopped = trio.Event(), trio.Event()
    runtime = EnclaveRuntime()
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            session = await _serving(nursery, tmp_path, runtime, stop, stopped, units=5)
            stop.set()
            with trio.fail_after(TIMEOUT):
                await runtime.wait_for(lambda r: r.accounting.final)
            assert runtime.quota.available == 0
            # Sent before this custodian reads the final return: it crosses it.
            await session.grant(3, 8)
            first = await session.next(Returned)
            assert (first.returned_total, first.served_total, first.final) == (5, 0, True)
            second = await session.next(Returned)
            assert (second.returned_total, second.final) == (8, True)
            await session.channel.send(ReturnAck(recall_id=None, returned_total=5))
            assert not stopped.is_set()
            await session.channel.send(ReturnAck(recall_id=None, returned_total=8))
            with trio.fail_after(TIMEOUT):
                await stopped.wait()
            nursery.cancel_scope.cancel()
    (done,) = [e for e in logs if e["event"] == "enclave_units_returned"]
    assert (done["returned_total"], done["granted_total"], done["in_doubt"]) == (8, 8, 0)
    assert not [e for e in logs if e["event"] == "enclave_units_in_doubt"]


async def test_a_clean_stop_without_an_acknowledgement_says_the_units_are_in_doubt(
    tmp_path: Path,
) -> None:
    stop, stopped = trio.Event(), trio.Event()
    runtime = EnclaveRuntime()
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            session = await _serving(nursery, tmp_path, runtime, stop, stopped, units=4)
            stop.set()
            await session.next(Returned)
            session.close()  # the custodian goes away before it acknowledges
            with trio.fail_after(TIMEOUT):
                await stopped.wait()
            nursery.cancel_scope.cancel()
    (line,) = [e for e in logs if e["event"] == "enclave_units_in_doubt"]
    assert line["units"] == 4
    assert line["log_level"] == "warning"
    assert "drm_custodian reclaim --instance" in line["fix"]

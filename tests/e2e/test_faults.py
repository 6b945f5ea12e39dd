"""Invariants I1, I2 and I4 (docs/invariants.md) under real process faults.

The custodian and the enclave run as processes on loopback; the consumer is
:class:`drm_consumer.Client` in the test process; faults are ``kill -9`` and a TCP fault
proxy (:mod:`drm_lab.faults`) between the enclave and the custodian. After each fault
the ledger is read over HTTPS (``GET /usage``) and checked *numerically* against what the
client saw succeed:

* I1: ``served <= granted`` and ``supplied == granted + remaining``;
* I2/I4: ``served + in_doubt == granted``; ``served`` equals the client's successes once
  the link is up and quiet (nothing lost, nothing counted twice);
* a dead instance's unreported units stay charged (``in_doubt``) and are never re-granted.

Every wait is bounded: a log event (:meth:`Daemon.wait_for`), a trio event of the proxy,
or a poll of another process's state (:func:`eventually`).
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import numpy as np
import pytest
import trio

from drm_consumer import (
    Client,
    ConnectionFailed,
    CustodianUnreachable,
    NoInferencesLeft,
)
from drm_lab.deployment import Enclave, Lab
from drm_lab.faults import fault_proxy
from drm_lab.models import big_model, tiny_model
from drm_lab.processes import LOOPBACK
from drm_wire.attestation.policy import Policy
from drm_wire.messages import EnclaveState, ModelDescription

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: One step against real processes: generous, it only bounds a hang.
STEP: Final = 30.0
#: The enclave declares the custodian link dead after 3 silent heartbeat intervals of
#: 1 s (docs/links.md, custodian link step 6); this is the bound the tests allow.
DEAD_LINK_BOUND: Final = 6.0
#: The earliest the link can be declared dead after a partition starts: the last message
#: got through at most one heartbeat interval before it.
DEAD_LINK_EARLIEST: Final = 1.5

#: Bound on any one poll of state that changes in another process.
POLL_TIMEOUT: Final = 30.0
POLL_INTERVAL: Final = 0.05

Usage = dict[str, int]


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, *, bound: float = POLL_TIMEOUT
) -> None:
    """Poll state owned by another process until ``check`` holds, at most ``bound`` s.

    Another process's state offers no event to wait on, so this polls; the bound makes a
    regression a failure instead of a hang.
    """
    with trio.move_on_after(bound):
        for _ in itertools.count():
            if await check():
                return
            await trio.sleep(POLL_INTERVAL)
    raise AssertionError(f"{what} within {bound} s")


def _inputs(model: ModelDescription, value: float = 0.5) -> dict[str, np.ndarray[Any, Any]]:
    return {
        spec.name: np.full([d or 1 for d in spec.shape], value, dtype=spec.dtype)
        for spec in model.inputs
    }


async def _usage(lab: Lab) -> Usage:
    return await trio.to_thread.run_sync(lab.usage)


async def _usage_when(lab: Lab, what: str, **expected: int) -> Usage:
    """Poll ``/usage`` until the given counters have these values; return it."""
    seen: list[Usage] = []

    async def matches() -> bool:
        seen.append(await _usage(lab))
        return all(seen[-1][k] == v for k, v in expected.items())

    try:
        await eventually(matches, f"{what}: /usage never showed {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last: {seen[-1] if seen else None}") from None
    return seen[-1]


def _check_ledger(usage: Usage) -> None:
    """I1 and the ledger's own arithmetic, whatever the moment."""
    assert usage["served"] <= usage["granted"], usage
    back = usage.get("returned", 0) + usage.get("reclaimed", 0)  # supply again (I20, I21)
    assert usage["supplied"] + back == usage["granted"] + usage["remaining"], usage
    assert usage["served"] + usage["in_doubt"] + back == usage["granted"], usage
    assert min(usage.values()) >= 0, usage


async def _serve_until_empty(client: Client, model: ModelDescription) -> int:
    """Infer with ``wait=0`` until the enclave has no inferences left; how many ran."""
    done = 0
    with trio.fail_after(STEP):
        while True:
            try:
                await client.infer(model.name, _inputs(model, done), wait=0)
            except NoInferencesLeft:
                return done
            done += 1


async def _serve(client: Client, model: ModelDescription, count: int) -> None:
    with trio.fail_after(STEP):
        for i in range(count):
            await client.infer(model.name, _inputs(model, i), wait=0)


async def _wait_log(daemon_wait: Any, event: str, **fields: object) -> dict[str, Any]:
    wait = partial(daemon_wait, event, timeout=STEP, **fields)
    result: dict[str, Any] = await trio.to_thread.run_sync(wait)
    return result


async def _only_model(client: Client) -> ModelDescription:
    (model,) = (await client.info()).models.values()
    return model


# --- 1. kill -9 of the enclave while requests are being served ---------------------------

WORKERS: Final = 4


async def test_enclave_killed_while_serving_strands_only_its_grant(lab: Lab) -> None:
    """I1/I2/I5 (Q05, C03): what the dead instance may have served stays charged as
    ``in_doubt``; its successor gets a new instance id and only what remains."""
    tiny = lab.write_model("tiny", tiny_model())
    await trio.to_thread.run_sync(partial(lab.start_custodian, [tiny], initial=12, lease=8))
    first: Enclave = await trio.to_thread.run_sync(lab.start_enclave, lab.custodian_port)
    _check_ledger(before := await _usage(lab))
    assert (before["granted"], before["remaining"]) == (8, 4)

    policy = Policy.load(lab.policy_path)
    ok, failed = 0, 0
    async with Client.connect(LOOPBACK, first.consumer_port, policy=policy) as client:
        model = await _only_model(client)

        async def worker(seed: int) -> None:
            nonlocal ok, failed
            while True:
                try:  # parks at zero: some request is always in flight at the kill
                    await client.infer(model.name, _inputs(model, seed))
                except ConnectionFailed:
                    failed += 1
                    return
                ok += 1
                if ok == 3:  # mid-stream: the other workers' requests are in flight
                    first.daemon.process.kill()
                    return

        with trio.fail_after(STEP):
            async with trio.open_nursery() as nursery:
                for seed in range(WORKERS):
                    nursery.start_soon(worker, seed)
    assert await trio.to_thread.run_sync(first.daemon.kill) == -9
    assert failed == WORKERS - 1, "a request in flight at the kill did not fail"
    assert lab.custodian is not None
    linked = lab.custodian.find("enclave_linked", instance=first.instance_id)
    assert linked is not None
    await _wait_log(lab.custodian.wait_for, "enclave_disconnected", conn_id=linked["conn_id"])

    dead = await _usage_when(lab, "the dead instance is unlinked", instances=0)
    _check_ledger(dead)
    # The dead instance served at least what the client saw, at most that plus the
    # requests cut in flight; the ledger recorded at most what it served (r <= s <= g).
    assert ok <= dead["granted"], (ok, dead)
    assert dead["served"] <= ok + failed, (ok, failed, dead)
    assert dead["in_doubt"] == dead["granted"] - dead["served"] >= ok - dead["served"]
    assert dead["supplied"] == 12

    await trio.to_thread.run_sync(lab.supply, 3)
    left = dead["remaining"] + 3
    assert left <= 8  # one lease: the successor gets it all in its first grant

    second: Enclave = await trio.to_thread.run_sync(lab.start_enclave, lab.custodian_port)
    assert second.instance_id != first.instance_id
    async with Client.connect(LOOPBACK, second.consumer_port, policy=policy) as client:
        info = await client.info()
        assert info.inferences_left == left, "the new instance got other than what remained"
        served_by_second = await _serve_until_empty(client, await _only_model(client))
    assert served_by_second == left

    final = await _usage_when(
        lab, "the successor's usage", served=dead["served"] + left, instances=1
    )
    _check_ledger(final)
    assert final["granted"] == dead["granted"] + left  # nothing re-granted to anyone
    assert final["in_doubt"] == dead["in_doubt"]  # the dead instance's loan stays charged
    assert (final["supplied"], final["remaining"]) == (15, 0)
    assert ok + served_by_second <= final["granted"]  # I3 across both instances


# --- 2. kill -9 of the custodian mid-upload ------------------------------------------------

#: Bytes of the upload let through before the proxy stalls it: well inside 50 MB.
UPLOAD_STALL_AT: Final = 16 * 1024 * 1024


async def test_custodian_killed_mid_upload_then_restarted(lab: Lab) -> None:
    """C01/C03/C08: a custodian killed while streaming a 50 MB model; restarted on the same
    state, it streams the model again; the enclave loads it once and serves exactly the
    initial supply, which the restart does not supply a second time."""
    big = lab.write_model("big", big_model(50))
    custodian = await trio.to_thread.run_sync(partial(lab.start_custodian, [big], initial=3))
    async with fault_proxy(lab.custodian_port) as proxy:
        # Stop the upload at a known point instead of racing a loopback transfer.
        proxy.downstream.limit(UPLOAD_STALL_AT)
        enclave: Enclave = await trio.to_thread.run_sync(
            partial(lab.start_enclave, proxy.port, link_up=False)
        )
        with trio.fail_after(STEP):
            await proxy.downstream.exhausted.wait()
        await _wait_log(enclave.daemon.wait_for, "model_receiving", model="big")
        progress = await _wait_log(custodian.wait_for, "model_transfer_progress", model="big")
        assert progress["percent"] < 100
        assert await trio.to_thread.run_sync(custodian.kill) == -9
        assert custodian.find("model_delivered") is None, "the upload was not cut"
        assert enclave.daemon.find("model_loaded") is None

        proxy.heal()
        seen = len(enclave.daemon.events)
        restarted = await trio.to_thread.run_sync(lab.restart_custodian)
        await _wait_log(partial(enclave.daemon.wait_for, after=seen), "custodian_link_up")
        # The custodian logs the delivery once the enclave's model_loaded reaches it, which
        # can be just after the enclave logs its link up: wait, do not race the other log.
        await _wait_log(restarted.wait_for, "model_delivered", model="big")

        policy = Policy.load(lab.policy_path)
        async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
            info = await client.info()
            assert info.state is EnclaveState.SERVING
            assert info.inferences_left == 3
            served = await _serve_until_empty(client, info.models["big"])
        assert served == 3

        usage = await _usage_when(lab, "the restarted custodian's usage", served=3)
    _check_ledger(usage)
    assert usage == {
        "supplied": 3, "granted": 3, "served": 3, "in_doubt": 0, "remaining": 0, "instances": 1,
    }  # fmt: skip
    loaded = [e for e in enclave.daemon.events if e.get("event") == "model_loaded"]
    assert len(loaded) == 1, loaded


# --- 3. kill -9 of the custodian between serving and reporting --------------------------------


async def test_custodian_killed_before_the_report_lands(lab: Lab) -> None:
    """I4 (C01, C08): inferences served while the report cannot reach the custodian, which
    is then killed; after the restart the enclave resends its total and the ledger shows
    exactly the client's successes, then keeps counting exactly."""
    tiny = lab.write_model("tiny", tiny_model())
    await trio.to_thread.run_sync(partial(lab.start_custodian, [tiny], initial=10))
    async with fault_proxy(lab.custodian_port) as proxy:
        enclave: Enclave = await trio.to_thread.run_sync(lab.start_enclave, proxy.port)
        policy = Policy.load(lab.policy_path)
        async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
            model = await _only_model(client)
            await _serve(client, model, 2)
            await _usage_when(lab, "the first reports", served=2)

            # Reports (enclave -> custodian) are held; grants and heartbeats still arrive,
            # so the enclave serves on, as it should within its grant.
            proxy.upstream.close()
            await _serve(client, model, 3)
            assert (await _usage(lab))["served"] == 2  # the reports are in the air
            assert lab.custodian is not None
            assert await trio.to_thread.run_sync(lab.custodian.kill) == -9

            proxy.heal()
            seen = len(enclave.daemon.events)
            restarted = await trio.to_thread.run_sync(lab.restart_custodian)
            await _wait_log(partial(enclave.daemon.wait_for, after=seen), "custodian_link_up")
            after = await _usage_when(lab, "the resent report", served=5)
            _check_ledger(after)
            assert after == {
                "supplied": 10, "granted": 10, "served": 5, "in_doubt": 5, "remaining": 0,
                "instances": 1,
            }  # fmt: skip
            assert restarted.find("consumption_report", served=5) is not None

            assert await _serve_until_empty(client, model) == 5  # the grant was re-synced
        final = await _usage_when(lab, "the last reports", served=10)
    _check_ledger(final)
    assert (final["granted"], final["in_doubt"]) == (10, 0)


# --- 4. a silent partition -----------------------------------------------------------------


async def test_silent_partition_stops_serving_within_the_heartbeat_bound(lab: Lab) -> None:
    """I9 and I4 (N01, N06): a partition that drops nothing and closes nothing; the
    enclave refuses with ``custodian_unreachable`` within the heartbeat bound, resumes
    once the partition heals, and the ledger then counts every success exactly once."""
    tiny = lab.write_model("tiny", tiny_model())
    await trio.to_thread.run_sync(partial(lab.start_custodian, [tiny], initial=10))
    async with fault_proxy(lab.custodian_port) as proxy:
        enclave: Enclave = await trio.to_thread.run_sync(lab.start_enclave, proxy.port)
        policy = Policy.load(lab.policy_path)
        async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
            model = await _only_model(client)
            await _serve(client, model, 1)
            await _usage_when(lab, "the first report", served=1)

            proxy.partition()
            started = trio.current_time()
            # Until the silence is noticed, the enclave serves from its grant (N01).
            await _serve(client, model, 1)

            async def unreachable() -> bool:
                return (await client.info()).state is EnclaveState.CUSTODIAN_UNREACHABLE

            await eventually(unreachable, "still serving", bound=DEAD_LINK_BOUND)
            with trio.fail_after(STEP), pytest.raises(CustodianUnreachable):
                await client.infer(model.name, _inputs(model), wait=0)
            elapsed = trio.current_time() - started
            assert DEAD_LINK_EARLIEST <= elapsed <= DEAD_LINK_BOUND, elapsed
            during = await _usage(lab)
            _check_ledger(during)
            assert during["served"] == 1  # the second report is held by the partition

            seen = len(enclave.daemon.events)
            proxy.heal()
            await _wait_log(partial(enclave.daemon.wait_for, after=seen), "custodian_link_up")

            async def serving() -> bool:
                return (await client.info()).state is EnclaveState.SERVING

            await eventually(serving, "not serving after the partition healed")
            await _serve(client, model, 1)
        final = await _usage_when(lab, "every success reported", served=3)
    _check_ledger(final)
    assert final == {
        "supplied": 10, "granted": 10, "served": 3, "in_doubt": 7, "remaining": 0, "instances": 1,
    }  # fmt: skip


# --- 5. a second enclave with the same license -----------------------------------------------


async def test_a_second_instance_is_refused_and_the_first_serves_on(lab: Lab) -> None:
    """Q06: a second enclave process with the same license, while the first is linked, is
    refused (``duplicate_instance``), is granted nothing and serves nothing; the first
    keeps its link and serves on."""
    tiny = lab.write_model("tiny", tiny_model())
    await trio.to_thread.run_sync(partial(lab.start_custodian, [tiny], initial=10, lease=5))
    first: Enclave = await trio.to_thread.run_sync(lab.start_enclave, lab.custodian_port)
    policy = Policy.load(lab.policy_path)
    async with Client.connect(LOOPBACK, first.consumer_port, policy=policy) as client:
        model = await _only_model(client)
        await _serve(client, model, 1)

        seen_first = len(first.daemon.events)
        second: Enclave = await trio.to_thread.run_sync(
            partial(lab.start_enclave, lab.custodian_port, link_up=False)
        )
        assert second.instance_id != first.instance_id
        assert lab.custodian is not None
        await _wait_log(
            lab.custodian.wait_for, "enclave_duplicate_instance", instance=second.instance_id
        )
        failure = await _wait_log(second.daemon.wait_for, "custodian_link_failed")
        assert "duplicate" in str(failure).lower(), failure

        async with Client.connect(LOOPBACK, second.consumer_port, policy=policy) as other:
            assert (await other.info()).state is EnclaveState.CUSTODIAN_UNREACHABLE
            with trio.fail_after(STEP), pytest.raises(CustodianUnreachable):
                await other.infer(model.name, _inputs(model), wait=0)

        await _serve(client, model, 1)
        assert (await client.info()).state is EnclaveState.SERVING
        assert first.daemon.find("custodian_link_down", after=seen_first) is None
    assert second.daemon.find("custodian_link_up") is None
    usage = await _usage_when(lab, "the first instance's reports", served=2)
    _check_ledger(usage)
    # One lease of 5, to the first instance only: a grant to the second would show here.
    assert usage == {
        "supplied": 10, "granted": 5, "served": 2, "in_doubt": 3, "remaining": 5, "instances": 1,
    }  # fmt: skip

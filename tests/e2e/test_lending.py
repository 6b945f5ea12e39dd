"""The lending story end to end: real custodian and enclave processes, the real client.

* Quota of 2 -> two inferences -> the third parks -> the operator tops up over HTTPS ->
  it completes -> the ledger shows 3 served -> the custodian shuts down -> the enclave
  refuses to serve (the kill switch).
* A consumer whose policy names another enclave is refused in the handshake.
* No quota and ``wait=0`` / a short wait; block and unblock from the admin API.
* The custodian restarts on its port: the enclave redials, serves the rest of its grant
  over the same consumer connection, and the ledger kept what was served.

Where a state change happens in another process and there is no event to wait for, the
tests poll it with a bound (:func:`_eventually`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import numpy as np
import pytest
import trio

from drm_consumer import (
    AttestationRefused,
    Blocked,
    Client,
    CustodianUnreachable,
    InferenceOutcome,
    NoInferencesLeft,
)
from drm_wire.attestation.policy import Policy
from drm_wire.messages import EnclaveState
from tests.e2e.conftest import INITIAL_INFERENCES, Deployment

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: One step against real processes on loopback: generous, only bounds a hang.
STEP_TIMEOUT: Final = 30.0
#: How often to re-read state that changes asynchronously (the ledger, the link state).
POLL_INTERVAL: Final = 0.05


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> bool:
    """Re-check state that changes asynchronously in another process, bounded.

    Real processes offer no event to wait on for these (a ledger row, a link state), so
    this polls; the bound makes a regression a failure instead of a hang.
    """
    for _ in range(int(STEP_TIMEOUT / POLL_INTERVAL)):
        if await check():
            return True
        await trio.sleep(POLL_INTERVAL)
    pytest.fail(f"{what} within {STEP_TIMEOUT} s")


def _x(seed: float) -> dict[str, np.ndarray[tuple[int, int], np.dtype[np.float32]]]:
    return {"x": np.full((1, 4), seed, dtype=np.float32)}


def _check_softmax(outcome: InferenceOutcome) -> None:
    (y,) = outcome.outputs.values()
    assert y.shape == (1, 3)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)


async def test_quota_top_up_usage_and_kill_switch(deployment: Deployment) -> None:
    policy = Policy.load(deployment.policy_path)
    admin = deployment.admin
    async with Client.connect(
        deployment.consumer_host, deployment.consumer_port, policy=policy
    ) as client:
        assert client.attestation.simulated
        assert client.attestation.mr_enclave in policy.mr_enclave
        info = await client.info()
        assert info.state is EnclaveState.SERVING
        (model,) = info.models
        assert info.inferences_left == INITIAL_INFERENCES

        with trio.fail_after(STEP_TIMEOUT):
            first = await client.infer(model, _x(0.5))
            second = await client.infer(model, _x(1.5))
        assert (first.inferences_left, second.inferences_left) == (1, 0)
        _check_softmax(first)

        positions: list[int] = []
        parked = trio.Event()
        outcomes: list[InferenceOutcome] = []

        def on_waiting(position: int) -> None:
            positions.append(position)
            parked.set()

        async def third() -> None:
            outcomes.append(await client.infer(model, _x(2.5), on_waiting=on_waiting))

        with trio.fail_after(STEP_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(third)
                await parked.wait()
                assert outcomes == []
                await trio.to_thread.run_sync(admin.supply, 3)
        assert positions
        _check_softmax(outcomes[0])
        assert outcomes[0].inferences_left == 2

        async def served_three() -> bool:
            return bool((await trio.to_thread.run_sync(admin.usage))["served"] == 3)

        await _eventually(served_three, "the ledger did not show 3 served")

        deployment.custodian.terminate()
        assert await trio.to_thread.run_sync(deployment.custodian.wait_exit) == 0

        async def link_is_down() -> bool:
            return (await client.info()).state is not EnclaveState.SERVING

        await _eventually(link_is_down, "the enclave still says it is serving")
        with trio.fail_after(STEP_TIMEOUT), pytest.raises(CustodianUnreachable):
            await client.infer(model, _x(3.5))
    assert await trio.to_thread.run_sync(deployment.enclave.stop) == 0


async def test_a_policy_for_another_enclave_is_refused(deployment: Deployment) -> None:
    policy = Policy.load(deployment.policy_path)
    other = dataclasses.replace(
        policy, mr_enclave=(hashlib.sha256(b"not the enclave that runs").digest(),)
    )
    with trio.fail_after(STEP_TIMEOUT), pytest.raises(AttestationRefused):
        async with Client.connect(deployment.consumer_host, deployment.consumer_port, policy=other):
            pytest.fail("connected to an enclave the policy refuses")
    # The refused handshake did not hurt the enclave: a good client still gets served.
    async with Client.connect(
        deployment.consumer_host, deployment.consumer_port, policy=policy
    ) as client:
        info = await client.info()
        (model,) = info.models
        with trio.fail_after(STEP_TIMEOUT):
            _check_softmax(await client.infer(model, _x(0.25)))


async def _state_is(client: Client, state: EnclaveState) -> bool:
    return (await client.info()).state is state


async def test_no_wait_block_and_unblock(deployment: Deployment) -> None:
    policy = Policy.load(deployment.policy_path)
    admin = deployment.admin
    async with Client.connect(
        deployment.consumer_host, deployment.consumer_port, policy=policy
    ) as client:
        (model,) = (await client.info()).models
        with trio.fail_after(STEP_TIMEOUT):
            for _ in range(INITIAL_INFERENCES):
                await client.infer(model, _x(1.0))
            with pytest.raises(NoInferencesLeft):
                await client.infer(model, _x(1.0), wait=0)
            waited: list[int] = []
            with pytest.raises(NoInferencesLeft):
                await client.infer(model, _x(1.0), wait=0.2, on_waiting=waited.append)
            assert waited

        await trio.to_thread.run_sync(admin.supply, 5)
        with trio.fail_after(STEP_TIMEOUT):
            assert (await client.infer(model, _x(1.0))).inferences_left >= 0

        await trio.to_thread.run_sync(admin.block, "e2e test")
        await _eventually(lambda: _state_is(client, EnclaveState.BLOCKED), "not blocked")
        with trio.fail_after(STEP_TIMEOUT), pytest.raises(Blocked):
            await client.infer(model, _x(1.0))

        await trio.to_thread.run_sync(admin.unblock)
        await _eventually(lambda: _state_is(client, EnclaveState.SERVING), "not unblocked")
        with trio.fail_after(STEP_TIMEOUT):
            _check_softmax(await client.infer(model, _x(1.0)))

        async def served(n: int) -> bool:
            return bool((await trio.to_thread.run_sync(admin.usage))["served"] == n)

        await _eventually(lambda: served(INITIAL_INFERENCES + 2), "the ledger missed a served one")


async def test_service_resumes_when_the_custodian_comes_back(deployment: Deployment) -> None:
    policy = Policy.load(deployment.policy_path)
    async with Client.connect(
        deployment.consumer_host, deployment.consumer_port, policy=policy
    ) as client:
        (model,) = (await client.info()).models
        with trio.fail_after(STEP_TIMEOUT):
            assert (await client.infer(model, _x(1.0))).inferences_left == 1

        deployment.custodian.terminate()
        assert await trio.to_thread.run_sync(deployment.custodian.wait_exit) == 0
        await _eventually(
            lambda: _state_is(client, EnclaveState.CUSTODIAN_UNREACHABLE), "link still up"
        )
        with trio.fail_after(STEP_TIMEOUT), pytest.raises(CustodianUnreachable):
            await client.infer(model, _x(1.0))

        seen = len(deployment.enclave.events)
        await trio.to_thread.run_sync(deployment.restart_custodian)
        await trio.to_thread.run_sync(
            partial(deployment.enclave.wait_for, "custodian_link_up", after=seen)
        )
        await _eventually(lambda: _state_is(client, EnclaveState.SERVING), "not serving again")
        with trio.fail_after(STEP_TIMEOUT):
            # The same connection still works: the grant was re-synced, not re-issued.
            assert (await client.infer(model, _x(1.0))).inferences_left == 0
            with pytest.raises(NoInferencesLeft):
                await client.infer(model, _x(1.0), wait=0)

        admin = deployment.admin

        async def served_two() -> bool:
            usage = await trio.to_thread.run_sync(admin.usage)
            return bool(usage["served"] == INITIAL_INFERENCES)

        await _eventually(served_two, "the restarted custodian's ledger lost a served one")

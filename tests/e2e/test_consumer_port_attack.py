"""I17: a peer of the consumer port, authenticated or not, costs bounded memory and time.

Real processes on loopback: a custodian and an enclave started as the operator does, the
attackers are :class:`drm_lab.hostile.RawConsumer` connections (TLS without verifying the
enclave, then raw frames) and the honest consumer is :class:`drm_consumer.Client`. Memory
is the enclave's ``VmPeak`` (the most virtual memory it ever had: what SGX must commit),
compared with its value before the attack; the allowed growth is the payload budget the
enclave was started with plus :data:`MARGIN` for what is not payload (64 TLS sessions,
tasks, the allocator's arenas).

Each attack: idle connections that announce a 64 MiB payload and send one byte; a trickle
below the minimum rate; one connection with many large requests in flight; one client
flooding the park queue from many connections.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import numpy as np
import pytest
import trio

from drm_consumer import Client, NoInferencesLeft
from drm_lab.deployment import Enclave, Lab
from drm_lab.hostile import RawConsumer, vm_size
from drm_lab.models import tiny_model
from drm_lab.processes import LOOPBACK
from drm_wire.attestation.policy import Policy
from drm_wire.errors import ErrorCode
from drm_wire.limits import MiB
from drm_wire.messages import Error, InferenceRequest, InferenceResult, Waiting
from drm_wire.tensors import Tensor

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: The payload budget the enclave runs with here (MiB): smaller than the default so that
#: a breach shows plainly.
BUDGET_MIB: Final = 96
#: Growth of VmPeak allowed beyond the budget: what is not payload.
MARGIN: Final = 64 * MiB
#: Attackers in the idle and trickle attacks.
ATTACKERS: Final = 64
#: Bound on every step (it only bounds a hang).
STEP: Final = 30.0
#: The enclave's options: the budget above, the other limits at their defaults.
OPTIONS: Final = ("--payload-budget", str(BUDGET_MIB))


@asynccontextmanager
async def _attackers(enclave: Enclave, count: int) -> AsyncIterator[list[RawConsumer]]:
    """``count`` hostile connections (hello done), closed at the end whatever happened."""
    attackers: list[RawConsumer] = []
    try:
        for _ in range(count):
            attackers.append(await RawConsumer.connect(LOOPBACK, enclave.consumer_port))
        yield attackers
    finally:
        for attacker in attackers:
            await attacker.aclose()


#: The tiny model's lending terms here: one unit per request of up to 4 MiB of rows, so
#: the attacks' large requests are within the terms and reach the quota (and its queue).
TERMS: Final = """\
unit = "request"
max_batch = 262144
[inputs]
x = [[1, 262144], 4]
"""


def _start(lab: Lab, *, initial: int) -> Enclave:
    model = lab.write_model("tiny", tiny_model())
    model.with_suffix(".terms.toml").write_text(TERMS, encoding="utf-8")
    lab.start_custodian([model], initial=initial)
    return lab.start_enclave(lab.custodian_port, options=OPTIONS)


def _x(rows: int = 1) -> dict[str, np.ndarray[Any, Any]]:
    return {"x": np.full((rows, 4), 0.5, dtype=np.float32)}


async def _warm_up(lab: Lab, enclave: Enclave) -> int:
    """Serve a few requests, then return the enclave's VmPeak: the baseline."""
    policy = Policy.load(lab.policy_path)
    async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
        for _ in range(3):
            await client.infer("tiny", _x(), wait=0)
    return vm_size(enclave.daemon.process.pid, "VmPeak")


def _check_memory(enclave: Enclave, baseline: int) -> None:
    grown = vm_size(enclave.daemon.process.pid, "VmPeak") - baseline
    allowed = BUDGET_MIB * MiB + MARGIN
    assert grown <= allowed, (
        f"the enclave's VmPeak grew by {grown / MiB:.0f} MiB under attack; "
        f"allowed {allowed / MiB:.0f} MiB (budget + margin)"
    )


async def _honest_served(lab: Lab, enclave: Enclave) -> None:
    policy = Policy.load(lab.policy_path)
    with trio.fail_after(STEP):
        async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
            outcome = await client.infer("tiny", _x(), wait=0)
    assert outcome.outputs["y"].shape == (1, 3)


async def _closed_for(attacker: RawConsumer, code: ErrorCode) -> None:
    """The enclave tells ``attacker`` why (a connection-level error) and closes."""
    message = await attacker.receive()
    assert isinstance(message, Error), message
    assert message.code is code, message
    assert message.request_id is None, message
    assert await attacker.receive() is None


async def test_idle_partial_frames_cost_bytes_received_and_are_closed(lab: Lab) -> None:
    """64 connections announce 64 MiB each, send one byte and go idle: the enclave holds
    what they sent (not what they announced), serves an honest consumer meanwhile, and
    closes every one of them once the minimum rate's grace has passed."""
    enclave = await trio.to_thread.run_sync(lambda: _start(lab, initial=100))
    baseline = await _warm_up(lab, enclave)
    async with _attackers(enclave, ATTACKERS) as attackers:
        for attacker in attackers:
            await attacker.announce(64 * MiB, sent=1)
        await _honest_served(lab, enclave)
        _check_memory(enclave, baseline)
        with trio.fail_after(STEP):
            async with trio.open_nursery() as nursery:
                for attacker in attackers:
                    nursery.start_soon(_closed_for, attacker, ErrorCode.TIMEOUT)
    _check_memory(enclave, baseline)
    # Each is logged as it closes, maybe a moment after the attacker saw the end.
    daemon = enclave.daemon

    def all_logged(_: object) -> bool:
        return len(daemon.find_all("consumer_frame_too_slow")) >= ATTACKERS

    await trio.to_thread.run_sync(
        lambda: daemon.wait_for("consumer_frame_too_slow", timeout=STEP, check=all_logged)
    )
    await _honest_served(lab, enclave)


async def test_idle_connections_cannot_hold_every_slot(lab: Lab) -> None:
    """Attackers take every connection slot and idle after their hello: an honest
    consumer still gets in (the longest idle attacker is told ``busy`` and closed)."""
    model = lab.write_model("tiny", tiny_model())
    lab.start_custodian([model], initial=100)
    enclave = await trio.to_thread.run_sync(
        lambda: lab.start_enclave(lab.custodian_port, options=(*OPTIONS, "--max-connections", "8"))
    )
    async with _attackers(enclave, 8) as attackers:
        await _honest_served(lab, enclave)
        with trio.fail_after(STEP):
            await _closed_for(attackers[0], ErrorCode.BUSY)
    assert len(enclave.daemon.find_all("consumer_idle_connection_closed")) >= 1


async def _trickle(attacker: RawConsumer, closed: list[RawConsumer]) -> None:
    """Send 4 KiB every 0.25 s (16 KiB/s, below the 256 KiB/s minimum) until closed."""
    await attacker.announce(64 * MiB, sent=4096)
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            try:
                while True:
                    await trio.sleep(0.25)  # the attack's own pace, not a wait on state
                    await attacker.send_raw(b"\0" * 4096)
            except trio.BrokenResourceError:
                pass

        nursery.start_soon(send)
        message = await attacker.receive()
        assert isinstance(message, Error), message
        assert message.code is ErrorCode.TIMEOUT, message
        closed.append(attacker)
        nursery.cancel_scope.cancel()


async def test_trickle_below_the_minimum_rate_is_closed(lab: Lab) -> None:
    """A peer that keeps sending, too slowly to finish a frame in time, is closed once the
    grace is over: trickling does not buy time."""
    enclave = await trio.to_thread.run_sync(lambda: _start(lab, initial=100))
    baseline = await _warm_up(lab, enclave)
    closed: list[RawConsumer] = []
    async with _attackers(enclave, 16) as attackers:
        started = trio.current_time()
        # The grace is 5 s and the rate is far below the minimum: closed well within 15 s.
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                for attacker in attackers:
                    nursery.start_soon(_trickle, attacker, closed)
                await _honest_served(lab, enclave)
        assert len(closed) == len(attackers)
    assert trio.current_time() - started >= 4.5  # not before the grace
    _check_memory(enclave, baseline)


async def _flood(
    attacker: RawConsumer, count: int, rows: int, replies: dict[str, int], *, wait: float | None
) -> None:
    """Send ``count`` requests of ``rows`` rows, then read one reply per request."""
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            for request_id in range(1, count + 1):
                await attacker.send(
                    InferenceRequest(
                        request_id=request_id,
                        model="tiny",
                        inputs=(Tensor.from_numpy("x", _x(rows)["x"]),),
                        wait=wait,
                    )
                )

        nursery.start_soon(send)
        for _ in range(count):
            message = await attacker.receive()
            assert message is not None
            key = message.code.value if isinstance(message, Error) else message.TYPE
            replies[key] = replies.get(key, 0) + 1


async def test_many_large_requests_in_flight_stay_within_the_budget(lab: Lab) -> None:
    """One connection sends 64 requests of 4 MiB with no inferences left: the enclave
    parks at most its per-connection share of them (the rest: busy), its memory stays
    within the budget, and another consumer is still answered."""
    enclave = await trio.to_thread.run_sync(lambda: _start(lab, initial=3))
    baseline = await _warm_up(lab, enclave)  # spends the 3 inferences
    async with _attackers(enclave, 1) as (attacker,):
        replies: dict[str, int] = {}
        with trio.fail_after(STEP * 2):
            await _flood(attacker, 64, (4 * MiB) // 16, replies, wait=None)
        assert replies == {"waiting": 16, "busy": 48}, replies
        _check_memory(enclave, baseline)
        policy = Policy.load(lab.policy_path)
        with trio.fail_after(STEP):
            async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
                with pytest.raises(NoInferencesLeft):
                    await client.infer("tiny", _x(), wait=0.5)


async def test_one_client_cannot_fill_the_park_queue(lab: Lab) -> None:
    """One client opens 20 connections and parks 64 requests on each (1,280, more than
    the enclave's queue of 1,024): each connection parks at most its share, so an honest
    consumer still parks (and, with nothing supplied, is told ``no_inferences``, not
    ``busy``)."""
    enclave = await trio.to_thread.run_sync(lambda: _start(lab, initial=3))
    await _warm_up(lab, enclave)
    async with _attackers(enclave, 20) as attackers:
        totals: dict[str, int] = {}
        with trio.fail_after(STEP * 2):
            async with trio.open_nursery() as nursery:
                for attacker in attackers:
                    flood = functools.partial(_flood, attacker, 64, 1, totals, wait=None)
                    nursery.start_soon(flood)
        assert totals == {"waiting": 20 * 16, "busy": 20 * 48}, totals
        policy = Policy.load(lab.policy_path)
        with trio.fail_after(STEP):
            async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
                waited: list[int] = []
                with pytest.raises(NoInferencesLeft):
                    await client.infer("tiny", _x(), wait=1.0, on_waiting=waited.append)
        assert waited == [20 * 16 + 1], "the honest request parks behind the flood"


async def test_a_client_flooding_from_many_connections_is_served_in_turn(lab: Lab) -> None:
    """R09 against the real processes: one client (127.0.0.1) parks 16 requests on each of
    4 connections; another client (127.0.0.2) parks one later, is told it is second in
    line, and the owner's supply of 2 serves it: it does not wait behind all 64."""
    enclave = await trio.to_thread.run_sync(lambda: _start(lab, initial=3))
    await _warm_up(lab, enclave)  # the 3 units are used up: everything from now on parks
    async with _attackers(enclave, 4) as attackers:
        totals: dict[str, int] = {}
        with trio.fail_after(STEP * 2):
            async with trio.open_nursery() as nursery:
                for attacker in attackers:
                    flood = functools.partial(_flood, attacker, 16, 1, totals, wait=None)
                    nursery.start_soon(flood)
        assert totals == {"waiting": 4 * 16}, totals
        honest = await RawConsumer.connect(
            LOOPBACK, enclave.consumer_port, local_address="127.0.0.2"
        )
        try:
            request = InferenceRequest(
                request_id=1,
                model="tiny",
                inputs=(Tensor.from_numpy("x", _x()["x"]),),
                wait=None,
            )
            await honest.send(request)
            waiting = await honest.receive()
            assert isinstance(waiting, Waiting), waiting
            assert (waiting.request_id, waiting.position) == (1, 2)
            await trio.to_thread.run_sync(lab.supply, 2)
            result = await honest.receive()  # within STEP: not after 64 more units
            assert isinstance(result, InferenceResult), result
            assert (result.request_id, result.cost) == (1, 1)
        finally:
            await honest.aclose()

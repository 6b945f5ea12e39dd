"""The quota semaphore: FIFO parking, exact wake counts, deadlines, cancellation, kill switch.

Every test runs on trio's ``autojump_clock``: deadlines pass in virtual time, and tasks are
sequenced with ``wait_all_tasks_blocked``, never with a sleep.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from drm_enclave.quota import DEFAULT_MAX_PARKED, Lease, Quota, QuotaError
from drm_wire.errors import ErrorCode
from drm_wire.limits import MAX_GRANT_UNITS


class Failed(Exception):
    """The inference failed (stands in for an onnxruntime error)."""


def assert_balanced(quota: Quota) -> None:
    """The conservation law of the module docstring, and the no-barging rule."""
    total = quota.available + quota.in_use + quota.served_total + quota.forfeited
    assert total == quota.granted_total
    assert quota.available == 0 or quota.parked == 0


class Consumers:
    """Tasks that each take a unit, note the order they got it in, and hold it until told."""

    def __init__(self, quota: Quota, nursery: trio.Nursery) -> None:
        self.quota = quota
        self.nursery = nursery
        self.order: list[int] = []
        self.errors: dict[int, ErrorCode] = {}
        self.done: dict[int, trio.Event] = {}
        self.scopes: dict[int, trio.CancelScope] = {}

    def spawn(self, name: int, wait: float | None = None) -> None:
        self.done[name] = trio.Event()
        self.scopes[name] = trio.CancelScope()
        self.nursery.start_soon(self._run, name, wait)

    async def _run(self, name: int, wait: float | None) -> None:
        with self.scopes[name]:
            try:
                async with self.quota.take(wait):
                    self.order.append(name)
                    await self.done[name].wait()
            except QuotaError as exc:
                self.errors[name] = exc.code


@pytest.fixture
def quota() -> Quota:
    return Quota()


# --- basics --------------------------------------------------------------------------


async def test_take_commits_on_success(quota: Quota) -> None:
    assert quota.grant(2) == 0
    async with quota.take(wait=0) as lease:
        assert (quota.available, quota.in_use, lease.held) == (1, 1, True)
    assert not lease.held
    assert (quota.available, quota.in_use, quota.served_total, quota.granted_total) == (1, 0, 1, 2)
    assert_balanced(quota)


async def test_a_failed_inference_gives_its_unit_back(quota: Quota) -> None:
    """I10: error, no token."""
    quota.grant(1)
    with pytest.raises(Failed):
        async with quota.take(wait=0):
            raise Failed
    assert (quota.available, quota.served_total) == (1, 0)
    lease = await quota.acquire(wait=0)
    lease.release()
    assert (quota.available, quota.in_use) == (1, 0)


async def test_an_explicit_commit_survives_a_later_failure(quota: Quota) -> None:
    """Q08: the output existed, sending it failed: charged exactly once."""
    quota.grant(1)

    async def infer_then_fail_to_send() -> None:
        async with quota.take(wait=0) as lease:
            lease.commit()
            raise Failed

    with pytest.raises(Failed):
        await infer_then_fail_to_send()
    assert (quota.available, quota.served_total) == (0, 1)


async def test_a_lease_ends_once(quota: Quota) -> None:
    quota.grant(1)
    lease = await quota.acquire(wait=0)
    lease.commit()
    assert repr(lease) == "<Lease 1 committed>"
    with pytest.raises(RuntimeError, match="already committed"):
        lease.release()
    with pytest.raises(RuntimeError, match="already committed"):
        lease.commit()
    assert_balanced(quota)


def test_try_acquire_takes_a_free_unit_or_nothing(quota: Quota) -> None:
    assert quota.try_acquire() is None  # nothing granted: no lease, nothing parked
    assert (quota.available, quota.in_use, quota.parked) == (0, 0, 0)
    quota.grant(1)
    lease = quota.try_acquire()
    assert lease is not None
    assert (quota.available, quota.in_use) == (0, 1)
    lease.commit()
    assert quota.served_total == 1
    assert_balanced(quota)
    quota.grant(1)
    quota.suspend(ErrorCode.BLOCKED)
    with pytest.raises(QuotaError) as caught:
        quota.try_acquire()
    assert caught.value.code is ErrorCode.BLOCKED
    assert quota.in_use == 0


async def test_try_acquire_never_jumps_the_queue(quota: Quota) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(quota.acquire)
        await trio.testing.wait_all_tasks_blocked()
        assert quota.parked == 1
        quota.grant(1)  # the unit goes to the parked request, not to a newcomer
        assert quota.try_acquire() is None
    assert (quota.in_use, quota.parked) == (1, 0)


def test_leases_cannot_be_forged(quota: Quota) -> None:
    with pytest.raises(TypeError):
        Lease(quota, object())


async def test_no_wait_fails_at_once(quota: Quota, autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    with pytest.raises(QuotaError) as caught:
        await quota.acquire(wait=0)
    assert caught.value.code is ErrorCode.NO_INFERENCES
    assert (trio.current_time(), quota.parked) == (start, 0)


async def test_repr_shows_the_state(quota: Quota) -> None:
    quota.grant(3)
    assert repr(quota) == (
        "<Quota available=3 parked=0 in_use=0 served=0 granted=3 returned=0 suspended=None>"
    )


# --- parking, FIFO, exact wake counts ------------------------------------------------


async def test_parked_requests_wake_in_fifo_order(quota: Quota) -> None:
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        for name in range(5):
            consumers.spawn(name)
            await wait_all_tasks_blocked()  # park in a known order
        assert quota.parked == 5
        for expected in range(5):
            assert quota.grant(1) == 1
            await wait_all_tasks_blocked()
            assert consumers.order == list(range(expected + 1))
        for event in consumers.done.values():
            event.set()
    assert (quota.served_total, quota.available) == (5, 0)


async def test_a_grant_wakes_exactly_as_many_as_it_adds(quota: Quota) -> None:
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        for name in range(5):
            consumers.spawn(name)
            await wait_all_tasks_blocked()
        assert quota.grant(3) == 3  # handed to the three oldest, which run in any order
        assert (quota.parked, quota.in_use, quota.available) == (2, 3, 0)
        await wait_all_tasks_blocked()
        assert sorted(consumers.order) == [0, 1, 2]
        assert quota.grant(4) == 2  # two waiters left; the other two units stay available
        await wait_all_tasks_blocked()
        assert sorted(consumers.order[3:]) == [3, 4]
        assert (quota.parked, quota.available) == (0, 2)
        assert_balanced(quota)
        for event in consumers.done.values():
            event.set()


async def test_a_released_unit_goes_to_the_oldest_waiter(quota: Quota) -> None:
    quota.grant(1)
    lease = await quota.acquire(wait=0)
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        consumers.spawn(1)
        await wait_all_tasks_blocked()
        consumers.spawn(2)
        await wait_all_tasks_blocked()
        lease.release()
        await wait_all_tasks_blocked()
        assert (consumers.order, quota.available, quota.parked) == ([1], 0, 1)
        nursery.cancel_scope.cancel()
    assert_balanced(quota)


async def test_requests_are_told_their_queue_position(quota: Quota) -> None:
    positions: list[int] = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(lambda: quota.acquire(on_parked=positions.append))
            await wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert positions == [1, 2, 3]
    assert quota.parked == 0


async def test_a_failing_callback_leaves_nothing_parked(quota: Quota) -> None:
    def broken(position: int) -> None:
        raise Failed

    with pytest.raises(Failed):
        await quota.acquire(on_parked=broken)
    assert quota.parked == 0


# --- deadlines -----------------------------------------------------------------------


async def test_a_bounded_wait_gives_up_after_exactly_that_long(
    quota: Quota, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    with pytest.raises(QuotaError) as caught:
        await quota.acquire(wait=7.5)
    assert caught.value.code is ErrorCode.NO_INFERENCES
    assert trio.current_time() - start == pytest.approx(7.5)
    assert (quota.parked, quota.available) == (0, 0)
    quota.grant(1)  # nobody left to hand it to
    assert quota.available == 1


async def test_a_grant_before_the_deadline_is_taken(
    quota: Quota, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        consumers.spawn(1, wait=10)
        await wait_all_tasks_blocked()
        autojump_clock.jump(9.9)
        quota.grant(1)
        await wait_all_tasks_blocked()
        assert consumers.order == [1]
        autojump_clock.jump(100)  # the old deadline means nothing any more
        await wait_all_tasks_blocked()
        consumers.done[1].set()
    assert (consumers.errors, quota.served_total) == ({}, 1)


async def test_an_unbounded_wait_lasts_until_a_grant(
    quota: Quota, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        consumers.spawn(1, wait=None)
        await wait_all_tasks_blocked()
        autojump_clock.jump(10 * 86_400)
        await wait_all_tasks_blocked()
        assert quota.parked == 1
        quota.grant(1)
        await wait_all_tasks_blocked()
        consumers.done[1].set()
    assert quota.served_total == 1


# --- caps and validation -------------------------------------------------------------


async def test_too_many_parked_requests_get_busy_at_once() -> None:
    quota = Quota(max_parked=2)
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        consumers.spawn(0)
        consumers.spawn(1)
        await wait_all_tasks_blocked()
        with pytest.raises(QuotaError) as caught:
            await quota.acquire(wait=None)
        assert caught.value.code is ErrorCode.BUSY
        with pytest.raises(QuotaError) as caught:
            await quota.acquire(wait=0)  # not waiting is answered as such
        assert caught.value.code is ErrorCode.NO_INFERENCES
        quota.grant(1)
        await wait_all_tasks_blocked()
        consumers.spawn(2)  # room again
        await wait_all_tasks_blocked()
        assert quota.parked == 2
        nursery.cancel_scope.cancel()
    assert Quota()._max_parked == DEFAULT_MAX_PARKED


@pytest.mark.parametrize("units", [0, -1, True, MAX_GRANT_UNITS + 1, 1.5, "1", None])
def test_grant_refuses_bad_units(quota: Quota, units: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        quota.grant(units)  # type: ignore[arg-type]
    assert quota.granted_total == 0


@pytest.mark.parametrize("wait", [-1, math.nan, math.inf, 86_401, True, "5"])
async def test_acquire_refuses_bad_waits(quota: Quota, wait: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        await quota.acquire(wait=wait)  # type: ignore[arg-type]


def test_reset_and_max_parked_are_checked(quota: Quota) -> None:
    with pytest.raises(ValueError, match="units"):
        quota.reset(-1)
    with pytest.raises(TypeError, match="max_parked"):
        Quota(max_parked=1.5)  # type: ignore[arg-type]


async def test_the_shortfall_is_what_parked_requests_lack_and_every_change_is_signalled() -> None:
    """The demand signal's figure (version 4): the parked requests' costs beyond what is
    available, with a call each time it may have moved."""
    quota = Quota()
    calls: list[tuple[int, int]] = []
    quota.demand_changed = lambda: calls.append((quota.shortfall, quota.parked))
    quota.grant(1)
    assert (quota.shortfall, calls) == (0, [])  # nobody parked: nothing to signal

    async def hold(units: int, client: str) -> None:
        async with quota.take(units=units, client=client):
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for units, client in ((3, "a"), (2, "b")):
            nursery.start_soon(hold, units, client)
            await wait_all_tasks_blocked()
        assert (quota.shortfall, quota.parked) == (4, 2)  # 3 + 2 parked, 1 available
        assert calls[-1] == (4, 2)
        quota.grant(3)  # the head (3) is served; 1 is left for the next, which lacks 1
        assert (quota.shortfall, quota.parked) == (1, 1)
        assert calls[-1] == (1, 1)
        nursery.cancel_scope.cancel()  # the last one goes away: nobody lacks anything
    assert (quota.shortfall, quota.parked, calls[-1]) == (0, 0, (0, 0))

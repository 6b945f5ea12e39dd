"""The quota under cancellation and the kill switch: nothing lost, nothing served twice.

The races here are the two orders the module's theory of operation lists (cancel first,
grant first), the fast path's schedule point, and a unit handed over just as the switch
falls. Sequencing is by ``wait_all_tasks_blocked`` and synchronous steps, never sleeps.
"""

from __future__ import annotations

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from drm_enclave.quota import Quota, QuotaError
from drm_wire.errors import ErrorCode
from tests.enclave.test_quota import Consumers, assert_balanced


@pytest.fixture
def quota() -> Quota:
    return Quota()


# --- cancellation --------------------------------------------------------------------


async def test_a_cancelled_waiter_leaves_the_queue(quota: Quota) -> None:
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        for name in range(3):
            consumers.spawn(name)
            await wait_all_tasks_blocked()
        consumers.scopes[1].cancel()
        await wait_all_tasks_blocked()
        assert quota.parked == 2
        assert quota.grant(2) == 2
        await wait_all_tasks_blocked()
        assert sorted(consumers.order) == [0, 2]
        for event in consumers.done.values():
            event.set()
    assert (quota.served_total, quota.available) == (2, 0)


async def test_cancel_then_grant_in_one_step_gives_the_unit_to_the_next(quota: Quota) -> None:
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        for name in range(2):
            consumers.spawn(name)
            await wait_all_tasks_blocked()
        consumers.scopes[0].cancel()  # no checkpoint between these two lines
        assert quota.grant(1) == 1
        await wait_all_tasks_blocked()
        assert consumers.order == [1]
        consumers.done[1].set()
    assert (quota.served_total, quota.available, quota.in_use) == (1, 0, 0)


async def test_grant_then_cancel_in_one_step_loses_nothing(quota: Quota) -> None:
    """The race of the docstring: woken by a grant, cancelled before it ran."""
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        for name in range(2):
            consumers.spawn(name)
            await wait_all_tasks_blocked()
        assert quota.grant(1) == 1  # handed to 0...
        consumers.scopes[0].cancel()  # ...which is cancelled before it runs
        assert (quota.in_use, quota.parked) == (1, 1)
        await wait_all_tasks_blocked()
        # 0 got the lease, its body was cancelled, take() released it to 1.
        assert consumers.order == [0, 1]
        assert (quota.in_use, quota.parked, quota.available) == (1, 0, 0)
        consumers.done[1].set()
    assert (quota.served_total, quota.available, quota.in_use) == (1, 0, 0)
    assert_balanced(quota)


async def test_grant_then_cancel_with_nobody_else_returns_the_unit(quota: Quota) -> None:
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        consumers.spawn(0)
        await wait_all_tasks_blocked()
        quota.grant(1)
        consumers.scopes[0].cancel()
    assert (quota.available, quota.served_total, quota.in_use) == (1, 0, 0)


async def test_an_already_cancelled_caller_takes_nothing(quota: Quota) -> None:
    quota.grant(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        await quota.acquire(wait=0)
    assert (quota.available, quota.in_use) == (1, 0)


async def test_a_cancel_at_the_schedule_point_of_a_quick_take_loses_nothing() -> None:
    """Even with a unit available, acquire() yields once; a cancel landing there is harmless.

    trio runs each batch of ready tasks in random order, so repeat to land the cancel both
    before the consumer took its unit and while it sits at that schedule point.
    """
    for _ in range(50):
        quota = Quota()
        quota.grant(1)
        scope = trio.CancelScope()

        async def consumer(quota: Quota = quota, scope: trio.CancelScope = scope) -> None:
            with scope:
                async with quota.take(wait=0):
                    pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer)
            await trio.lowlevel.checkpoint()
            scope.cancel()
        assert quota.in_use == 0
        assert quota.available + quota.served_total == 1


# --- kill switch ---------------------------------------------------------------------


@pytest.mark.parametrize("code", [ErrorCode.CUSTODIAN_UNREACHABLE, ErrorCode.BLOCKED])
async def test_suspend_fails_parked_and_new_requests(quota: Quota, code: ErrorCode) -> None:
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        for name in range(3):
            consumers.spawn(name)
        await wait_all_tasks_blocked()
        assert quota.suspend(code) == 3
        await wait_all_tasks_blocked()
        assert consumers.errors == {0: code, 1: code, 2: code}
    quota.grant(2)  # kept, but not served while suspended
    for wait in (0, 5, None):
        with pytest.raises(QuotaError) as caught:
            await quota.acquire(wait=wait)
        assert caught.value.code is code
    assert (quota.available, quota.suspended, quota.parked) == (2, code, 0)
    quota.resume()
    assert quota.suspended is None
    async with quota.take(wait=0):
        pass
    assert (quota.available, quota.served_total) == (1, 1)


async def test_a_woken_request_that_has_not_run_fails_if_suspended(quota: Quota) -> None:
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        consumers.spawn(0)
        await wait_all_tasks_blocked()
        quota.grant(1)  # handed over...
        quota.suspend(ErrorCode.CUSTODIAN_UNREACHABLE)  # ...but the switch falls first
        await wait_all_tasks_blocked()
        assert consumers.errors == {0: ErrorCode.CUSTODIAN_UNREACHABLE}
        assert consumers.order == []
        nursery.cancel_scope.cancel()  # (a broken quota would leave 0 holding a lease)
    assert (quota.available, quota.in_use, quota.served_total) == (1, 0, 0)


async def test_running_leases_end_normally_during_a_suspension(quota: Quota) -> None:
    quota.grant(2)
    first = await quota.acquire(wait=0)
    second = await quota.acquire(wait=0)
    quota.suspend(ErrorCode.BLOCKED)
    first.commit()  # it ran before the switch: still reported
    second.release()
    assert (quota.available, quota.served_total, quota.in_use) == (1, 1, 0)


async def test_resume_can_set_what_survives(quota: Quota) -> None:
    quota.grant(5)
    quota.suspend(ErrorCode.CUSTODIAN_UNREACHABLE)
    quota.resume(available=2)  # the custodian vouches for 2
    assert (quota.available, quota.forfeited, quota.granted_total) == (2, 3, 5)
    assert_balanced(quota)
    quota.reset(4)
    assert (quota.available, quota.forfeited, quota.granted_total) == (4, 3, 7)
    assert_balanced(quota)


async def test_reset_upwards_wakes_waiters(quota: Quota) -> None:
    async with trio.open_nursery() as nursery:
        consumers = Consumers(quota, nursery)
        consumers.spawn(0)
        await wait_all_tasks_blocked()
        quota.reset(3)
        await wait_all_tasks_blocked()
        assert (consumers.order, quota.available) == ([0], 2)
        consumers.done[0].set()
    assert_balanced(quota)


def test_suspend_takes_only_kill_switch_codes(quota: Quota) -> None:
    with pytest.raises(ValueError, match="cannot suspend"):
        quota.suspend(ErrorCode.BUSY)
    assert quota.suspended is None

"""MemoryBudget, Account, Charge and ReceiveLimits: the arithmetic and the waiting (I17).

Time runs on trio's ``autojump_clock``; waits are observed with
``wait_all_tasks_blocked``, never with sleeps.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from drm_wire.limits import MiB
from drm_wire.net.budget import MIN_CONNECTION_SHARE, MemoryBudget, ReceiveLimits

SHARE = MIN_CONNECTION_SHARE


async def test_reserve_split_release_balance() -> None:
    budget = MemoryBudget(2 * SHARE, per_connection=SHARE)
    account = budget.account()
    await account.reserve_reading(1000)
    assert (budget.used, account.reading) == (1000, 1000)
    await account.reserve_reading(500)  # below what is reserved: nothing changes
    assert budget.used == 1000
    charge = account.split(600, keep_reading=100)
    assert (account.reading, account.held, charge.nbytes) == (100, 600, 600)
    assert budget.used == 700  # 300 of the reading reservation went back
    charge.release()
    charge.release()  # idempotent
    assert (account.held, budget.used) == (0, 100)
    account.close()
    assert budget.used == 0
    assert budget.peak == 1000
    with pytest.raises(trio.ClosedResourceError):
        await account.reserve_reading(1)


async def test_a_full_budget_makes_the_next_reader_wait_until_memory_is_freed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = MemoryBudget(SHARE + MiB, per_connection=SHARE)
    first, second = budget.account(), budget.account()
    await first.reserve_reading(SHARE)
    held = first.split(SHARE, keep_reading=0)
    reserved = trio.Event()

    async def reserve() -> None:
        await second.reserve_reading(2 * MiB)
        reserved.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reserve)
        await trio.testing.wait_all_tasks_blocked()
        assert not reserved.is_set()
        assert budget.waits == 1
        held.release()
        await reserved.wait()
    assert budget.used == 2 * MiB


async def test_one_connection_cannot_take_more_than_its_share(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = MemoryBudget(4 * SHARE, per_connection=SHARE)
    account = budget.account()
    await account.reserve_reading(SHARE - MiB)
    kept = account.split(SHARE - MiB, keep_reading=0)
    assert account.fits(MiB)
    assert not account.fits(2 * MiB)
    with trio.move_on_after(100) as waited:
        await account.reserve_reading(2 * MiB)  # room in the budget, not in the share
    assert waited.cancelled_caught
    assert budget.used == SHARE - MiB
    kept.release()
    await account.reserve_reading(2 * MiB)
    with pytest.raises(ValueError, match="exceed the share"):
        await account.reserve_reading(SHARE + 1)


async def test_closing_an_account_wakes_its_waiting_reader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = MemoryBudget(SHARE, per_connection=SHARE)
    hog, waiter = budget.account(), budget.account()
    await hog.reserve_reading(SHARE)
    async with trio.open_nursery() as nursery:

        async def wait() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await waiter.reserve_reading(1)

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        waiter.close()
        hog.close()


@pytest.mark.parametrize(
    ("total", "share"), [(SHARE - 1, SHARE - 1), (SHARE, SHARE + 1), (10 * SHARE, 1)]
)
def test_shares_out_of_bounds_are_refused(total: int, share: int) -> None:
    with pytest.raises(ValueError, match="per-connection share"):
        MemoryBudget(total, per_connection=share)


def test_frame_deadline_grows_with_the_bytes_received_up_to_the_timeout() -> None:
    limits = ReceiveLimits(budget=MemoryBudget(), frame_timeout=30, min_rate=1000, rate_grace=5)
    assert limits.frame_deadline(100.0, 0) == 105.0
    assert limits.frame_deadline(100.0, 10_000) == 115.0
    assert limits.frame_deadline(100.0, 10**9) == 130.0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_limits_must_be_positive_and_finite(bad: float) -> None:
    for name in ("frame_timeout", "min_rate", "rate_grace"):
        with pytest.raises(ValueError, match=name):
            ReceiveLimits(budget=MemoryBudget(), **{name: bad})

"""Returning units, enclave side (I20), without I/O: the quota takes back only idle units,
the accounting turns that into cumulative ``returned`` messages and checks their
acknowledgements. A recall from the custodian and a clean stop are one code path."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from drm_enclave.accounting import Accounting
from drm_enclave.quota import Quota, QuotaError
from drm_wire.errors import ErrorCode, RemoteProtocolError
from drm_wire.messages import Grant, Recall, ReturnAck, Returned


def fresh(granted: int = 0) -> tuple[Accounting, Quota]:
    quota = Quota()
    accounting = Accounting(quota)
    if granted:
        accounting.on_grant(Grant(grant_id=1, units=granted, granted_total=granted))
    return accounting, quota


def law(quota: Quota) -> None:
    assert (
        quota.available + quota.in_use + quota.served_total + quota.forfeited
        + quota.returned_total
        == quota.granted_total
    )  # fmt: skip
    assert quota.served_total + quota.returned_total <= quota.granted_total


def ack(returned: Returned) -> ReturnAck:
    return ReturnAck(recall_id=returned.recall_id, returned_total=returned.returned_total)


def test_a_recall_takes_back_only_idle_units_and_totals_grow() -> None:
    accounting, quota = fresh(10)
    running = quota.try_acquire(3)  # a request runs: its 3 units are not returnable
    assert running is not None
    first = accounting.on_recall(Recall(recall_id=1, units=4))
    assert (first.recall_id, first.returned_total, first.final) == (1, 4, False)
    assert quota.available == 3
    law(quota)
    second = accounting.on_recall(Recall(recall_id=2, units=100))  # more than is idle
    assert second.returned_total == 7  # cumulative: 4 + the 3 idle
    assert (quota.available, quota.in_use) == (0, 3)
    third = accounting.on_recall(Recall(recall_id=3, units=5))  # nothing idle: 0 more
    assert third.returned_total == 7
    running.commit()
    law(quota)
    # Sent and acknowledged in order.
    assert [accounting.next_return() for _ in range(4)] == [first, second, third, None]
    for returned in (first, second, third):
        accounting.on_return_ack(ack(returned))
    assert accounting.returns_acked == 7
    assert not accounting.returns_pending


async def test_units_owed_to_a_parked_request_are_not_returned() -> None:
    accounting, quota = fresh(2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: quota.acquire(units=5))  # parks: 2 of 5 are there
        await trio.testing.wait_all_tasks_blocked()
        assert quota.parked == 1
        returned = accounting.on_recall(Recall(recall_id=1, units=2))
        assert returned.returned_total == 0
        assert quota.available == 2
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "bad_ack",
    [
        ReturnAck(recall_id=1, returned_total=5),  # credits more than was sent
        ReturnAck(recall_id=1, returned_total=3),  # credits less
        ReturnAck(recall_id=9, returned_total=4),  # answers another recall
    ],
)
def test_an_acknowledgement_must_name_exactly_the_return_sent(bad_ack: ReturnAck) -> None:
    accounting, _ = fresh(10)
    accounting.on_recall(Recall(recall_id=1, units=4))
    accounting.next_return()
    with pytest.raises(RemoteProtocolError, match="does not match"):
        accounting.on_return_ack(bad_ack)


def test_an_acknowledgement_of_no_return_is_refused() -> None:
    accounting, _ = fresh(10)
    with pytest.raises(RemoteProtocolError, match="no return in flight"):
        accounting.on_return_ack(ReturnAck(recall_id=None, returned_total=0))


def test_a_final_return_takes_everything_idle_and_nothing_is_served_after_it() -> None:
    """Return then keep serving: after the final return the quota holds nothing, a grant
    that crossed it is given back at once, and no usage report goes any more."""
    accounting, quota = fresh(10)
    lease = quota.try_acquire(2)
    assert lease is not None
    lease.commit()
    accounting.served(2)
    final = accounting.take_back(None, final=True)
    assert (final.returned_total, final.served_total, final.final) == (8, 2, True)
    assert quota.try_acquire() is None  # nothing left to serve
    assert accounting.next_report() is None  # the final return carries the last total
    assert accounting.report_due_at(spacing=0.01, period=1.0) is None
    # A grant that crossed the final return on the wire: taken back, returned again.
    accounting.on_grant(Grant(grant_id=2, units=5, granted_total=15))
    assert quota.available == 0
    assert accounting.next_return() == final
    crossing = accounting.next_return()
    assert crossing is not None
    assert (crossing.returned_total, crossing.final) == (13, True)
    # A recall that crossed it is answered by a final return too.
    answer = accounting.on_recall(Recall(recall_id=4, units=1))
    assert (answer.recall_id, answer.final, answer.returned_total) == (4, True, 13)
    law(quota)
    accounting.on_return_ack(ack(final))
    accounting.on_return_ack(ack(crossing))
    assert accounting.returns_acked == 13
    assert accounting.acked_total == 2  # the served total came with the return


async def test_the_stop_suspends_first_so_no_request_takes_a_returned_unit() -> None:
    accounting, quota = fresh(4)
    quota.suspend(ErrorCode.CUSTODIAN_UNREACHABLE, "stopping")
    accounting.take_back(None, final=True)
    with pytest.raises(QuotaError) as caught:
        await quota.acquire(0)
    assert caught.value.code is ErrorCode.CUSTODIAN_UNREACHABLE
    assert quota.returned_total == 4


def test_a_new_link_drops_returns_of_the_old_one() -> None:
    accounting, _ = fresh(10)
    accounting.on_recall(Recall(recall_id=1, units=4))
    accounting.next_return()
    accounting.link_restarted()
    assert not accounting.returns_pending
    # The total stays: a later return carries it (a recall is answered on its own link).
    assert accounting.on_recall(Recall(recall_id=1, units=1)).returned_total == 5

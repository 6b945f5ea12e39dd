"""Idempotent grants and cumulative usage reports on the enclave side, over the quota's totals."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drm_enclave.accounting import Accounting
from drm_enclave.quota import Quota
from drm_wire.errors import RemoteProtocolError
from drm_wire.limits import MAX_GRANT_UNITS
from drm_wire.messages import Grant, UsageAck


def grant(total: int, units: int = 1) -> Grant:
    return Grant(grant_id=total, units=min(units, total), granted_total=total)


def fresh() -> tuple[Accounting, Quota]:
    """An instance's accounting over its quota, which keeps the totals."""
    quota = Quota()
    return Accounting(quota), quota


def serve(accounting: Accounting, quota: Quota, count: int = 1) -> bool:
    """Serve ``count`` inferences as the consumer server does: commit a lease on the quota
    for each, then tell the accounting; return what :meth:`Accounting.served` says."""
    for _ in range(count):
        lease = quota.try_acquire()
        assert lease is not None
        lease.commit()
    return accounting.served(count)


def test_grants_add_the_difference_and_replays_add_nothing() -> None:
    accounting, quota = fresh()
    assert accounting.on_grant(grant(3, 3)) == 3
    assert accounting.on_grant(grant(3, 3)) == 0  # replay
    assert accounting.on_grant(grant(8, 5)) == 5
    assert accounting.on_grant(grant(5, 2)) == 0  # reordered, stale
    assert accounting.on_grant(grant(10, 1)) == 2  # one grant was lost: the total wins
    assert quota.granted_total == 10
    assert quota.available == 10  # the units went to the quota


def test_a_grant_adding_more_than_one_quota_grant_takes_goes_in_steps() -> None:
    accounting, quota = fresh()
    total = 3 * MAX_GRANT_UNITS + 1  # one grant lost on the way, say
    big = Grant(grant_id=2, units=MAX_GRANT_UNITS, granted_total=total)
    assert accounting.on_grant(big) == total
    assert (quota.granted_total, quota.available) == (total, total)


def test_reports_are_cumulative_one_in_flight_and_batch() -> None:
    accounting, quota = fresh()
    accounting.on_grant(grant(10, 10))
    assert accounting.next_report() is None  # nothing served
    serve(accounting, quota)
    first = accounting.next_report()
    assert first is not None
    assert (first.seq, first.served_total) == (1, 1)
    serve(accounting, quota, 3)
    assert accounting.next_report() is None  # one in flight
    accounting.on_ack(UsageAck(seq=1, served_total=1))
    assert accounting.acked_total == 1
    second = accounting.next_report()
    assert second is not None
    assert (second.seq, second.served_total) == (2, 4)  # batched
    assert accounting.unreported == 3


SPACING, PERIOD = 0.01, 1.0


def due(accounting: Accounting) -> float | None:
    return accounting.report_due_at(spacing=SPACING, period=PERIOD)


def test_reports_go_at_once_after_quiet_then_per_period_unless_urgent() -> None:
    accounting, quota = fresh()
    accounting.on_grant(grant(100, 100))
    assert due(accounting) is None  # nothing served
    assert serve(accounting, quota) is True  # the first unreported: the reporter must look
    assert due(accounting) == -math.inf  # quiet so far: at once
    first = accounting.next_report(now=50.0)
    assert first is not None
    assert due(accounting) is None  # in flight
    accounting.on_ack(UsageAck(seq=first.seq, served_total=first.served_total))
    assert serve(accounting, quota) is True
    assert [serve(accounting, quota) for _ in range(47)] == [False] * 47  # nothing moves
    assert due(accounting) == 50.0 + PERIOD  # 48 of the 99 outstanding: not urgent
    assert serve(accounting, quota) is False  # 49 of 99: still less than half
    assert due(accounting) == 50.0 + PERIOD
    assert serve(accounting, quota) is True  # 50 of 99: half
    assert due(accounting) == 50.0 + SPACING  # urgent: the custodian must refill soon
    second = accounting.next_report(now=50.5)
    assert second is not None
    assert second.served_total == 51


def test_a_draining_or_reconnected_instance_reports_soon() -> None:
    accounting, quota = fresh()
    accounting.on_grant(grant(100, 100))
    serve(accounting, quota)
    report = accounting.next_report(now=7.0)
    assert report is not None
    accounting.on_ack(UsageAck(seq=report.seq, served_total=report.served_total))
    serve(accounting, quota)
    assert due(accounting) == 7.0 + PERIOD
    accounting.flush()
    assert due(accounting) == 7.0 + SPACING
    accounting.link_restarted()
    assert due(accounting) == -math.inf


def test_reconnect_resends_the_current_total() -> None:
    accounting, quota = fresh()
    accounting.on_grant(grant(5, 5))
    serve(accounting, quota, 2)
    assert accounting.next_report() is not None
    accounting.link_restarted()
    again = accounting.next_report()
    assert again is not None
    assert again.served_total == 2
    with pytest.raises(RemoteProtocolError, match="answers no report in flight"):
        accounting.on_ack(UsageAck(seq=1, served_total=2))  # the old link's ack


def test_mismatched_or_unexpected_acks_are_protocol_errors() -> None:
    accounting, quota = fresh()
    with pytest.raises(RemoteProtocolError):
        accounting.on_ack(UsageAck(seq=1, served_total=0))
    accounting.on_grant(grant(5, 5))
    serve(accounting, quota, 2)
    report = accounting.next_report()
    assert report is not None
    with pytest.raises(RemoteProtocolError, match="does not match"):
        accounting.on_ack(UsageAck(seq=report.seq, served_total=3))


def test_serving_beyond_grants_cannot_be_counted() -> None:
    """The quota hands out no unit beyond the grants, and the report reads its count."""
    accounting, quota = fresh()
    accounting.on_grant(grant(1))
    serve(accounting, quota)
    assert quota.try_acquire() is None
    assert quota.served_total == 1
    report = accounting.next_report()
    assert report is not None
    assert report.served_total == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["grant", "serve", "report", "ack", "restart"]), st.integers(0, 20)
        ),
        max_size=60,
    )
)
def test_totals_never_decrease_and_served_never_exceeds_granted(
    steps: list[tuple[str, int]],
) -> None:
    accounting, quota = fresh()
    in_flight = None
    for action, n in steps:
        before = (quota.granted_total, quota.served_total, accounting.acked_total)
        if action == "grant":
            accounting.on_grant(grant(n, max(n, 1)) if n else grant(1))
        elif action == "serve":
            room = quota.granted_total - quota.served_total
            serve(accounting, quota, min(n, room))
        elif action == "report":
            in_flight = accounting.next_report() or in_flight
        elif action == "ack" and in_flight is not None:
            # An ack of a report that a restart forgot is refused; the totals stay put.
            with contextlib.suppress(RemoteProtocolError):
                accounting.on_ack(UsageAck(seq=in_flight.seq, served_total=in_flight.served_total))
            in_flight = None
        elif action == "restart":
            accounting.link_restarted()
        after = (quota.granted_total, quota.served_total, accounting.acked_total)
        assert all(b <= a for b, a in zip(before, after, strict=True))
        assert accounting.acked_total <= quota.served_total <= quota.granted_total

"""Idempotent grants and cumulative usage reports on the enclave side."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drm_enclave.accounting import Accounting
from drm_wire.errors import RemoteProtocolError
from drm_wire.messages import Grant, UsageAck


def grant(total: int, units: int = 1) -> Grant:
    return Grant(grant_id=total, units=min(units, total), granted_total=total)


def test_grants_add_the_difference_and_replays_add_nothing() -> None:
    accounting = Accounting()
    assert accounting.on_grant(grant(3, 3)) == 3
    assert accounting.on_grant(grant(3, 3)) == 0  # replay
    assert accounting.on_grant(grant(8, 5)) == 5
    assert accounting.on_grant(grant(5, 2)) == 0  # reordered, stale
    assert accounting.on_grant(grant(10, 1)) == 2  # one grant was lost: the total wins
    assert accounting.granted_total == 10


def test_reports_are_cumulative_one_in_flight_and_batch() -> None:
    accounting = Accounting()
    accounting.on_grant(grant(10, 10))
    assert accounting.next_report() is None  # nothing served
    accounting.served()
    first = accounting.next_report()
    assert first is not None
    assert (first.seq, first.served_total) == (1, 1)
    accounting.served(3)
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
    accounting = Accounting()
    accounting.on_grant(grant(100, 100))
    assert due(accounting) is None  # nothing served
    assert accounting.served() is True  # the first unreported: the reporter must look
    assert due(accounting) == -math.inf  # quiet so far: at once
    first = accounting.next_report(now=50.0)
    assert first is not None
    assert due(accounting) is None  # in flight
    accounting.on_ack(UsageAck(seq=first.seq, served_total=first.served_total))
    assert accounting.served() is True
    assert [accounting.served() for _ in range(47)] == [False] * 47  # nothing moves
    assert due(accounting) == 50.0 + PERIOD  # 48 of the 99 outstanding: not urgent
    assert accounting.served() is False  # 49 of 99: still less than half
    assert due(accounting) == 50.0 + PERIOD
    assert accounting.served() is True  # 50 of 99: half
    assert due(accounting) == 50.0 + SPACING  # urgent: the custodian must refill soon
    second = accounting.next_report(now=50.5)
    assert second is not None
    assert second.served_total == 51


def test_a_draining_or_reconnected_instance_reports_soon() -> None:
    accounting = Accounting()
    accounting.on_grant(grant(100, 100))
    accounting.served()
    report = accounting.next_report(now=7.0)
    assert report is not None
    accounting.on_ack(UsageAck(seq=report.seq, served_total=report.served_total))
    accounting.served()
    assert due(accounting) == 7.0 + PERIOD
    accounting.flush()
    assert due(accounting) == 7.0 + SPACING
    accounting.link_restarted()
    assert due(accounting) == -math.inf


def test_reconnect_resends_the_current_total() -> None:
    accounting = Accounting()
    accounting.on_grant(grant(5, 5))
    accounting.served(2)
    assert accounting.next_report() is not None
    accounting.link_restarted()
    again = accounting.next_report()
    assert again is not None
    assert again.served_total == 2
    with pytest.raises(RemoteProtocolError, match="answers no report in flight"):
        accounting.on_ack(UsageAck(seq=1, served_total=2))  # the old link's ack


def test_mismatched_or_unexpected_acks_are_protocol_errors() -> None:
    accounting = Accounting()
    with pytest.raises(RemoteProtocolError):
        accounting.on_ack(UsageAck(seq=1, served_total=0))
    accounting.on_grant(grant(5, 5))
    accounting.served(2)
    report = accounting.next_report()
    assert report is not None
    with pytest.raises(RemoteProtocolError, match="does not match"):
        accounting.on_ack(UsageAck(seq=report.seq, served_total=3))


def test_serving_beyond_grants_is_a_bug_not_a_count() -> None:
    accounting = Accounting()
    accounting.on_grant(grant(1))
    accounting.served()
    with pytest.raises(RuntimeError, match="served more than granted"):
        accounting.served()
    assert accounting.served_total == 1


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
    accounting = Accounting()
    in_flight = None
    for action, n in steps:
        before = (accounting.granted_total, accounting.served_total, accounting.acked_total)
        if action == "grant":
            accounting.on_grant(grant(n, max(n, 1)) if n else grant(1))
        elif action == "serve":
            room = accounting.granted_total - accounting.served_total
            accounting.served(min(n, room))
        elif action == "report":
            in_flight = accounting.next_report() or in_flight
        elif action == "ack" and in_flight is not None:
            # An ack of a report that a restart forgot is refused; the totals stay put.
            with contextlib.suppress(RemoteProtocolError):
                accounting.on_ack(UsageAck(seq=in_flight.seq, served_total=in_flight.served_total))
            in_flight = None
        elif action == "restart":
            accounting.link_restarted()
        after = (accounting.granted_total, accounting.served_total, accounting.acked_total)
        assert all(b <= a for b, a in zip(before, after, strict=True))
        assert accounting.acked_total <= accounting.served_total <= accounting.granted_total

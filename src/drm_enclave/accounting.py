"""The enclave's side of the usage ledger: idempotent grants and cumulative usage reports.

Sans-IO: the custodian link feeds it the grants and acknowledgements it receives and sends
the reports it produces; nothing here waits or touches a socket.

Theory of operation. An enclave *instance* (one process, one random instance id) has two
monotonic totals: ``granted_total``, the inferences the custodian has granted this
instance, and ``served_total``, the inferences it has served. The instance's
:class:`~.quota.Quota` owns both (units enter it only through grants and leave it only
through committed leases, so one object keeps them in step); :class:`Accounting` keeps
no count of its own, and reads them there. Both travel as totals, never as increments:

* a :class:`~drm_wire.messages.Grant` carries the instance's new ``granted_total``; the
  units it adds are the difference to the quota's, so a replayed, duplicated or
  reordered grant adds nothing (P4, I2); :meth:`Accounting.on_grant` grants that
  difference to the quota;
* a :class:`~drm_wire.messages.UsageReport` carries the quota's ``served_total``; the
  custodian records the largest total it has seen, so a report sent twice (say, resent
  after a reconnect) counts once (P4, I4).

One report is in flight at a time. When it is acknowledged (after the custodian's durable
commit), the next one carries whatever was served meanwhile, which batches naturally
under load. After a reconnect, :meth:`Accounting.link_restarted` forgets the report in
flight, so the next :meth:`Accounting.next_report` resends the current total.

When to report (:meth:`Accounting.report_due_at`). Every report is a durable commit and a
ledger row at the custodian, so reports are as rare as the custodian's needs allow:

* *at once* after a quiet ``period`` (a lone inference is seen at once);
* *urgently*, ``spacing`` after the last one, once the inferences served since the last
  acknowledgement reach half of what the custodian believes is outstanding
  (``granted_total - acked_total``): the custodian refills from reports, a lease at a
  time once less than half a lease is outstanding, so it hears in time to refill while a
  quarter of the lease is still in hand; and when draining (:meth:`Accounting.flush`);
* otherwise once a ``period`` after the last one: the custodian's view lags by at most that.

A busy instance thus reports a few times per lease and at least once a period, not once per
``spacing``.

Returning units (docs/links.md, *Returning units*; I20). :meth:`Accounting.take_back`
takes idle units out of the quota (a custodian's recall, or all of them for a clean
stop) and queues a :class:`~drm_wire.messages.Returned` carrying the quota's cumulative
``returned_total`` with its served totals; :meth:`Accounting.next_return` hands the
queued ones to the sender in order, and :meth:`Accounting.on_return_ack` matches each
acknowledgement to the oldest return in flight. Once a final return is queued
(:attr:`Accounting.final`) no usage report is sent any more (the final return carries the
last served total), and a grant that crossed it on the wire is taken back at once and
returned in another final return (:meth:`Accounting.on_grant`).
"""

from __future__ import annotations

import math

from drm_wire.errors import RemoteProtocolError
from drm_wire.limits import MAX_GRANT_UNITS
from drm_wire.messages import Grant, Recall, ReturnAck, Returned, UsageAck, UsageReport

from .quota import Quota

__all__ = ["Accounting"]


class Accounting:
    """The usage-report sequence of one enclave instance, over the totals its quota keeps.

    Args:
        quota: the instance's quota, which owns ``granted_total`` and ``served_total``.
    """

    __slots__ = (
        "_acked_total",
        "_flush",
        "_in_flight",
        "_last_sent_at",
        "_next_seq",
        "_quota",
        "_returns_acked",
        "_returns_due",
        "_returns_in_flight",
        "final",
    )

    def __init__(self, quota: Quota) -> None:
        self._quota = quota
        self._acked_total = 0
        self._next_seq = 1
        self._in_flight: UsageReport | None = None
        #: When the last report was sent (the caller's clock): -inf, never.
        self._last_sent_at = -math.inf
        self._flush = False
        #: Returns queued (not sent yet), and sent but not acknowledged, oldest first.
        self._returns_due: list[Returned] = []
        self._returns_in_flight: list[Returned] = []
        #: The largest returned total the custodian has acknowledged.
        self._returns_acked = 0
        #: A final return was queued: the instance is stopping (no report after it).
        self.final = False

    def __repr__(self) -> str:
        return (
            f"<Accounting acked={self._acked_total} unreported={self.unreported} "
            f"in_flight={self._in_flight is not None}>"
        )

    @property
    def acked_total(self) -> int:
        """The largest served total the custodian has durably recorded."""
        return self._acked_total

    @property
    def unreported(self) -> int:
        """Inferences served but not yet acknowledged by the custodian."""
        return self._quota.served_total - self._acked_total

    def on_grant(self, grant: Grant) -> int:
        """Apply a grant to the quota; return the units it adds (0 for a replay or a stale
        grant).

        The total is what counts: if a grant was lost on a dropped link, the next one's
        total still brings the instance to what the custodian recorded for it. The
        difference may exceed what one :meth:`Quota.grant <.quota.Quota.grant>` takes,
        so it goes in steps.
        """
        added = grant.granted_total - self._quota.granted_total
        remaining = added
        while remaining > 0:
            step = min(remaining, MAX_GRANT_UNITS)
            self._quota.grant(step)
            remaining -= step
        if self.final and added > 0:  # it crossed our final return: give it back at once
            self.take_back(None, final=True)
        return max(added, 0)

    # --- returning units ----------------------------------------------------------

    @property
    def returns_acked(self) -> int:
        """The largest returned total the custodian has acknowledged."""
        return self._returns_acked

    @property
    def returns_pending(self) -> bool:
        """Whether a return is queued or awaits its acknowledgement."""
        return bool(self._returns_due or self._returns_in_flight)

    def take_back(self, recall_id: int | None = None, *, final: bool = False) -> Returned:
        """Take idle units out of the quota and queue the return that says so.

        ``final`` (a clean stop): every idle unit, and the instance is stopping from now
        on. Otherwise it answers the custodian's recall ``recall_id`` (see
        :meth:`on_recall`). Returns the queued message.
        """
        if final:
            self.final = True
            self._quota.take_back(None)
        return self._queue(recall_id)

    def on_recall(self, recall: Recall) -> Returned:
        """Answer a recall: give back at most ``recall.units`` idle units (maybe none);
        once stopping, every return is final (and takes everything idle)."""
        if self.final:
            return self.take_back(recall.recall_id, final=True)
        self._quota.take_back(recall.units)
        return self._queue(recall.recall_id)

    def _queue(self, recall_id: int | None) -> Returned:
        quota = self._quota
        returned = Returned(
            recall_id=recall_id,
            returned_total=quota.returned_total,
            served_total=quota.served_total,
            requests_total=quota.requests_served,
            final=self.final,
        )
        self._returns_due.append(returned)
        return returned

    def next_return(self) -> Returned | None:
        """The oldest queued return, now in flight, or ``None``."""
        if not self._returns_due:
            return None
        returned = self._returns_due.pop(0)
        self._returns_in_flight.append(returned)
        return returned

    def on_return_ack(self, ack: ReturnAck) -> None:
        """Apply the acknowledgement of the oldest return in flight.

        Raises:
            RemoteProtocolError: it answers no return in flight, or names another total
                than the one sent (the custodian must have credited exactly that).
        """
        if not self._returns_in_flight:
            raise RemoteProtocolError("return_ack answers no return in flight", field="type")
        returned = self._returns_in_flight[0]
        if ack.recall_id != returned.recall_id or ack.returned_total != returned.returned_total:
            raise RemoteProtocolError(
                "return_ack does not match the return sent",
                field="returned_total",
                got=ack.returned_total,
                limit=returned.returned_total,
            )
        self._returns_in_flight.pop(0)
        self._returns_acked = max(self._returns_acked, ack.returned_total)
        # The return carried the served total, recorded with it.
        self._acked_total = max(self._acked_total, returned.served_total)

    def served(self, count: int = 1) -> bool:
        """Note that ``count`` leases were just committed on the quota (which counted them).

        Returns:
            Whether :meth:`report_due_at` may have moved: the first unreported inference,
            or the one that makes a report urgent. Other inferences change nothing the
            reporter waits for, so the hot path need not wake it.
        """
        if count < 0:
            raise ValueError("count must not be negative")
        served = self._quota.served_total
        before = served - count
        return count > 0 and (
            before == self._acked_total or self._urgent(served) != self._urgent(before)
        )

    def _urgent(self, served: int) -> bool:
        unreported = served - self._acked_total
        return unreported > 0 and 2 * unreported >= self._quota.granted_total - self._acked_total

    def flush(self) -> None:
        """Draining: report what is left at the spacing, not the period."""
        self._flush = True

    def report_due_at(self, *, spacing: float, period: float) -> float | None:
        """When the next report is due (on the clock :meth:`next_report` was given), or
        ``None`` while there is nothing to report or a report is in flight. See the module
        docstring."""
        served = self._quota.served_total
        if self.final or self._in_flight is not None or served == self._acked_total:
            return None
        soon = self._flush or self._urgent(served)
        return self._last_sent_at + (spacing if soon else period)

    def next_report(self, now: float = -math.inf) -> UsageReport | None:
        """The report to send now (sent at ``now``), if there is something to report and
        none is in flight; whether it is due yet is :meth:`report_due_at`'s call."""
        served = self._quota.served_total
        if self.final or self._in_flight is not None or served == self._acked_total:
            return None
        report = UsageReport(
            seq=self._next_seq,
            served_total=served,
            requests_total=self._quota.requests_served,
        )
        self._next_seq += 1
        self._in_flight = report
        self._last_sent_at = now
        return report

    def on_ack(self, ack: UsageAck) -> None:
        """Apply an acknowledgement of the report in flight.

        Raises:
            RemoteProtocolError: the acknowledgement answers no report in flight, or
                acknowledges a total we never reported.
        """
        report = self._in_flight
        if report is None or ack.seq != report.seq:
            raise RemoteProtocolError(
                f"usage_ack {ack.seq} answers no report in flight", field="seq"
            )
        if ack.served_total != report.served_total:
            raise RemoteProtocolError(
                "usage_ack does not match the reported total",
                field="served_total",
                got=ack.served_total,
                limit=report.served_total,
            )
        self._acked_total = max(self._acked_total, ack.served_total)
        self._in_flight = None

    def link_restarted(self) -> None:
        """A new custodian link: the report in flight may be lost, so send it again, at once.

        Returns in flight or queued are dropped: a recall belongs to its link, and a
        final return is sent only on a synced link (the caller asks again).
        """
        self._in_flight = None
        self._last_sent_at = -math.inf
        self._returns_due.clear()
        self._returns_in_flight.clear()

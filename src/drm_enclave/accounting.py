"""The enclave's side of the usage ledger: idempotent grants and cumulative usage reports.

Sans-IO: the custodian link feeds it the grants and acknowledgements it receives and sends
the reports it produces; nothing here waits or touches a socket.

Theory of operation. An enclave *instance* (one process, one random instance id) counts two
monotonic totals: ``granted_total``, the inferences the custodian has granted this
instance, and ``served_total``, the inferences it has served. Both travel as totals, never
as increments:

* a :class:`~drm_wire.messages.Grant` carries the instance's new ``granted_total``; the
  units it adds are the difference to what the instance already has, so a replayed,
  duplicated or reordered grant adds nothing (invariant 1);
* a :class:`~drm_wire.messages.UsageReport` carries ``served_total``; the custodian records
  the largest total it has seen, so a report sent twice (say, resent after a reconnect)
  counts once (invariant 2).

One report is in flight at a time. When it is acknowledged (after the custodian's durable
commit), the next one carries whatever was served meanwhile, which batches naturally
under load. After a reconnect, :meth:`Accounting.link_restarted` forgets the report in
flight, so the next :meth:`Accounting.next_report` resends the current total.
"""

from __future__ import annotations

from drm_wire.errors import RemoteProtocolError
from drm_wire.messages import Grant, UsageAck, UsageReport

__all__ = ["Accounting"]


class Accounting:
    """Granted and served totals of one enclave instance, and its report sequence."""

    __slots__ = ("_acked_total", "_in_flight", "_next_seq", "granted_total", "served_total")

    def __init__(self) -> None:
        #: Inferences the custodian has granted this instance, in total.
        self.granted_total = 0
        #: Inferences this instance has served, in total.
        self.served_total = 0
        self._acked_total = 0
        self._next_seq = 1
        self._in_flight: UsageReport | None = None

    def __repr__(self) -> str:
        return (
            f"<Accounting granted={self.granted_total} served={self.served_total} "
            f"acked={self._acked_total} in_flight={self._in_flight is not None}>"
        )

    @property
    def acked_total(self) -> int:
        """The largest served total the custodian has durably recorded."""
        return self._acked_total

    @property
    def unreported(self) -> int:
        """Inferences served but not yet acknowledged by the custodian."""
        return self.served_total - self._acked_total

    def on_grant(self, grant: Grant) -> int:
        """Apply a grant; return the units it adds (0 for a replay or a stale grant).

        The total is what counts: if a grant was lost on a dropped link, the next one's
        total still brings the instance to what the custodian recorded for it.
        """
        added = grant.granted_total - self.granted_total
        if added <= 0:
            return 0
        self.granted_total = grant.granted_total
        return added

    def served(self, count: int = 1) -> None:
        """Record ``count`` inferences as served (after each one has run)."""
        if count < 0:
            raise ValueError("count must not be negative")
        if self.served_total + count > self.granted_total:
            raise RuntimeError("served more than granted: the quota must prevent this")
        self.served_total += count

    def next_report(self) -> UsageReport | None:
        """The report to send now, if one is due and none is in flight."""
        if self._in_flight is not None or self.served_total == self._acked_total:
            return None
        report = UsageReport(seq=self._next_seq, served_total=self.served_total)
        self._next_seq += 1
        self._in_flight = report
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
        """A new custodian link: the report in flight may be lost, so send it again."""
        self._in_flight = None

"""The ledger's records, errors and input checks: the vocabulary of :mod:`.ledger`.

Kept apart from the SQL so that code which only reads balances or handles ledger errors
(the admin API, the enclave link) need not look at storage details.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from drm_wire.errors import DrmError
from drm_wire.limits import MAX_UINT

#: Borrower names, instance ids and idempotency keys: an instance id is a 64-char hex digest;
#: 128 leaves room for readable names while bounding what a leaked admin token can store.
MAX_NAME_LEN: Final = 128


class LedgerError(DrmError):
    """Root of the ledger's errors. When one is raised, nothing was written."""


class LedgerInputError(LedgerError, ValueError):
    """A value of the wrong type or out of range; ``field`` names it, ``got`` says what came."""

    def __init__(self, message: str, *, field: str, got: object) -> None:
        super().__init__(f"{field}: {message} (got {got!r})")
        self.field = field
        self.got = got


class LedgerStorageError(LedgerError):
    """SQLite failed (disk full, I/O error, not WAL, another schema version).

    The transaction was rolled back, so there is no partial row (C02): the caller must not
    send the grant it was recording, and should answer "unavailable".
    """


class IdempotencyConflict(LedgerError):
    """An idempotency key was reused for a different supply (another borrower or amount)."""


class GrantRefused(LedgerError):
    """A grant was refused. ``remaining`` is the supply left when it was."""

    def __init__(self, message: str, *, borrower: str, remaining: int) -> None:
        super().__init__(message)
        self.borrower = borrower
        self.remaining = remaining


class InsufficientSupply(GrantRefused):
    """More units were asked than the borrower's remaining supply (I1)."""


class BorrowerBlocked(GrantRefused):
    """The borrower is blocked (I13: once blocked, grants stop growing)."""


class InstanceRetired(GrantRefused):
    """The instance stopped cleanly or was reclaimed: it gets nothing more (I20, I21)."""


class ReclaimRefused(LedgerError):
    """A write-off the ledger cannot record: no such instance, or already reclaimed."""


@dataclass(frozen=True, slots=True)
class SupplyResult:
    """A committed top-up. ``replayed`` is true when a retry returned the original record.

    ``grants`` are those committed in the same transaction for the instances the caller
    named (send each now, I6); ``balance`` is the borrower's balance read in that
    transaction, after the supply and those grants.
    """

    supply_id: int
    borrower: str
    units: int
    idempotency_key: str | None
    at: float
    balance: Balance = field(compare=False)
    replayed: bool = field(default=False, compare=False)
    grants: tuple[Grant, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class Grant:
    """A committed grant. ``cumulative`` is what goes on the wire (P4): the instance's total."""

    grant_id: int
    borrower: str
    instance_id: str
    units: int
    cumulative: int
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageReport:
    """One instance's cumulative served count (inferences) and the requests they were
    served in, as reported with sequence number ``seq``."""

    borrower: str
    instance_id: str
    served_total: int
    seq: int
    requests_total: int = 0

    def __post_init__(self) -> None:
        _check_name(self.borrower, "borrower")
        _check_name(self.instance_id, "instance_id")
        _check_int(self.served_total, "served_total", low=0, high=MAX_UINT)
        _check_int(self.seq, "seq", low=0, high=MAX_UINT)
        _check_int(self.requests_total, "requests_total", low=0, high=self.served_total)


@dataclass(frozen=True, slots=True)
class UsageResult:
    """The ledger's view of an instance after a report."""

    borrower: str
    instance_id: str
    served_total: int  #: the recorded cumulative count: the max of all reports so far
    granted: int  #: cumulative units granted to the instance
    advanced: bool  #: this report raised ``served_total`` (false: a duplicate or stale one)
    over_grant: bool  #: ``served_total > granted``: a broken invariant, to investigate
    #: The borrower's balance when the transaction that recorded the report (and, in a
    #: batch, every report with it) committed: what a link logs and plans its next grant
    #: from, without a second trip to the ledger.
    balance: Balance


@dataclass(frozen=True, slots=True)
class Balance:
    """A borrower's account, derived from the records in one consistent read.

    ``in_doubt`` is, per instance, what was granted but not (yet) reported served; it stays
    charged (P2). ``remaining`` is what may still be granted.
    """

    supplied: int
    granted: int
    served: int
    in_doubt: int
    remaining: int
    blocked: bool
    #: Requests the served inferences came in (a batch of k is k inferences, 1 request).
    requests: int = 0
    #: Units the enclaves confirmed they gave back (I20): supply again.
    returned: int = 0
    #: Units in doubt the owner wrote off (I21): supply again, never a confirmed return.
    reclaimed: int = 0


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One enclave instance as the ledger knows it (``usage`` lists them)."""

    instance_id: str
    granted: int
    served: int
    requests: int
    returned: int
    reclaimed: int
    #: It sent a final return: it stopped cleanly (I20).
    stopped: bool

    @property
    def in_doubt(self) -> int:
        """Granted and neither served, returned nor written off."""
        return max(self.granted - self.served - self.returned - self.reclaimed, 0)

    #: The owner wrote it off (a reclaim record, even one of 0 units; I21).
    was_reclaimed: bool = False

    @property
    def retired(self) -> str | None:
        """Why the instance id is refused for good (``reclaimed``, ``stopped``), or ``None``."""
        if self.was_reclaimed:
            return "reclaimed"
        return "stopped" if self.stopped else None


@dataclass(frozen=True, slots=True)
class ReturnResult:
    """The ledger's answer to an instance's return (I20).

    ``returned_total`` is the instance's recorded total after it (what ``return_ack``
    names); ``credited`` what this return added (0 for a replay); ``refused`` says why
    nothing was credited, or is ``None``. The served total in the return is recorded
    either way (it was served).
    """

    returned_total: int
    credited: int
    served_total: int
    granted: int
    refused: str | None
    balance: Balance


@dataclass(frozen=True, slots=True)
class ReclaimResult:
    """An owner's write-off (I21): ``units`` left doubt for the supply."""

    instance_id: str
    units: int
    balance: Balance


def _check_int(value: object, name: str, *, low: int, high: int) -> int:
    if type(value) is not int:  # a bool is an int; an int subclass could lie about itself
        raise LedgerInputError("must be an int", field=name, got=type(value).__name__)
    if not low <= value <= high:
        raise LedgerInputError(f"must be in [{low}, {high}]", field=name, got=value)
    return value


def _check_name(
    value: object, name: str, *, max_len: int = MAX_NAME_LEN, empty: bool = False
) -> str:
    if type(value) is not str:
        raise LedgerInputError("must be a str", field=name, got=type(value).__name__)
    if len(value) > max_len or (not value and not empty) or not value.isprintable():
        # isprintable() refuses newlines and escapes, so names are safe in logs (M07).
        raise LedgerInputError(
            f"must be 1-{max_len} printable characters", field=name, got=value[:32]
        )
    return value

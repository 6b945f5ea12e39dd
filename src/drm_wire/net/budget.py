"""A memory budget for bytes received from peers nobody vouches for, and the limits of
receiving them.

Theory of operation
-------------------
The consumer port is open to any TLS client. What a connection costs in memory is what
its frame decoder holds (a partial frame, received bytes only: the decoder grows payloads
as they arrive, see :mod:`drm_wire.framing`) plus the payloads of its requests that are
queued, parked or running. A :class:`MemoryBudget` bounds the sum over all connections;
each connection draws on it through an :class:`Account`, which also bounds that
connection's share.

The reader of a channel (:mod:`drm_wire.net.channel`) *reserves before it reads*: before
each ``receive_some(n)`` it raises its account's reading reservation to what the decoder
holds plus ``n`` (:meth:`Account.reserve_reading`), waiting while the budget or the share
is full. So the decoder never holds a byte that was not charged first, and a connection
whose share is full stops being read: TCP pushes back on its peer, not on anyone else.
When a whole message is decoded its bytes become a :class:`Charge` (:meth:`Account.split`)
that whoever keeps the message (a request task) releases when it is done with it.

Idle peers hold next to nothing: a connection reserves one small read
(:data:`HEADER_READ`) ahead of what it has sent, and the reads of a payload grow with the
bytes the peer has actually sent (up to :data:`PAYLOAD_READ`), so a header announcing
64 MiB followed by one byte reserves 16 KiB. A stream that decrypts in place has the
payload's storage grown before a read instead (by the read, and past
:data:`PAYLOAD_READ` by what it already holds, so a large payload takes a few steps),
the room charged first like a read: a connection then holds at most twice what it was
sent of a payload, plus one small read. A connection in the middle of a frame must also
keep up a minimum rate (:class:`ReceiveLimits`), so it cannot hold what it sent for long
either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import trio

from drm_wire.limits import (
    CONNECTION_SHARE_BYTES,
    FRAME_TIMEOUT,
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    MIN_TRANSFER_RATE,
    PAYLOAD_BUDGET_BYTES,
    PREFIX_BYTES,
    RATE_GRACE,
    KiB,
    MiB,
)

__all__ = [
    "HEADER_READ",
    "MIN_CONNECTION_SHARE",
    "PAYLOAD_READ",
    "Account",
    "Charge",
    "MemoryBudget",
    "ReceiveLimits",
]

#: Largest read while no payload is due (a header, or small frames back to back).
HEADER_READ: Final = 16 * KiB
#: Largest read of a payload: large enough that a bulk payload costs few calls.
PAYLOAD_READ: Final = 1 * MiB
#: The smallest share that lets one full-size frame through.
MIN_CONNECTION_SHARE: Final = PREFIX_BYTES + MAX_HEADER_BYTES + MAX_PAYLOAD_BYTES + PAYLOAD_READ


class MemoryBudget:
    """Bytes all connections may hold at once, and each one's share of them.

    Args:
        total: the budget in bytes.
        per_connection: the most one connection may hold (at least
            :data:`MIN_CONNECTION_SHARE`, at most ``total``).

    Attributes:
        used, peak: bytes held now, and the most ever held.
        waits: reservations that had to wait for memory (the budget or a share was full).
    """

    def __init__(
        self, total: int = PAYLOAD_BUDGET_BYTES, *, per_connection: int = CONNECTION_SHARE_BYTES
    ) -> None:
        if not MIN_CONNECTION_SHARE <= per_connection <= total:
            raise ValueError(
                f"the per-connection share must be from {MIN_CONNECTION_SHARE} bytes (one "
                f"full-size frame) to the budget ({total} bytes), got {per_connection}"
            )
        self.total = total
        self.per_connection = per_connection
        self.used = 0
        self.peak = 0
        self.waits = 0
        self._freed = trio.Event()

    def __repr__(self) -> str:
        return f"<MemoryBudget used={self.used} peak={self.peak} total={self.total}>"

    def account(self) -> Account:
        """A new connection's account (close it when the connection ends)."""
        return Account(self)

    def _take(self, nbytes: int) -> None:
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def _give_back(self, nbytes: int) -> None:
        if nbytes:
            self.used -= nbytes
            self._freed.set()
            self._freed = trio.Event()


class Account:
    """One connection's draw on a :class:`MemoryBudget`.

    ``reading`` is reserved for the decoder; ``held`` is in :class:`Charge` objects that
    outlive their frame. Both count towards the connection's share.
    """

    __slots__ = ("_budget", "_closed", "held", "reading")

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self.reading = 0
        self.held = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"<Account reading={self.reading} held={self.held}>"

    def fits(self, target: int) -> bool:
        """Whether :meth:`reserve_reading` of ``target`` would not wait for memory."""
        budget = self._budget
        need = target - self.reading
        return need <= 0 or (
            budget.used + need <= budget.total
            and self.reading + self.held + need <= budget.per_connection
        )

    async def reserve_reading(self, target: int) -> None:
        """Raise the reading reservation to ``target`` bytes, waiting for memory as needed.

        A reservation above target is kept (it is lowered only by :meth:`split`).

        Raises:
            trio.ClosedResourceError: the account was closed.
            ValueError: ``target`` exceeds the share: no wait could satisfy it.
        """
        budget = self._budget
        if target > budget.per_connection:
            raise ValueError(f"{target} bytes exceed the share of {budget.per_connection}")
        waited = False
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the connection's account is closed")
            if self.fits(target):
                need = max(0, target - self.reading)
                budget._take(need)
                self.reading += need
                await trio.lowlevel.checkpoint_if_cancelled()
                return
            if not waited:
                waited = True
                budget.waits += 1
            await budget._freed.wait()

    def split(self, nbytes: int, *, keep_reading: int) -> Charge:
        """Move ``nbytes`` of the reading reservation into a :class:`Charge` (a decoded
        message's bytes), and lower what stays reserved for reading to ``keep_reading``."""
        nbytes = max(0, min(nbytes, self.reading))
        self.reading -= nbytes
        self.held += nbytes
        surplus = max(0, self.reading - keep_reading)
        self.reading -= surplus
        self._budget._give_back(surplus)
        return Charge(self, nbytes)

    def close(self) -> None:
        """Release the reading reservation; later reservations fail. Charges stay until
        their owners release them."""
        self._closed = True
        reading, self.reading = self.reading, 0
        self._budget._give_back(reading)

    def _release(self, nbytes: int) -> None:
        self.held -= nbytes
        self._budget._give_back(nbytes)


class Charge:
    """Bytes of one received message, held until :meth:`release` (idempotent)."""

    __slots__ = ("_account", "nbytes")

    def __init__(self, account: Account | None, nbytes: int) -> None:
        self._account = account
        self.nbytes = nbytes

    def __repr__(self) -> str:
        return f"<Charge {self.nbytes} bytes{'' if self._account else ' released'}>"

    def release(self) -> None:
        account, self._account = self._account, None
        if account is not None:
            account._release(self.nbytes)


#: A charge of nothing, for channels without a budget.
NO_CHARGE: Final = Charge(None, 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiveLimits:
    """How a channel receives from a peer nobody vouches for.

    Attributes:
        budget: the memory its frames and kept messages draw on.
        frame_timeout: seconds a frame may take from its first byte to its last.
        min_rate: bytes/s a frame must average from its first byte, after ``rate_grace``.
        rate_grace: seconds of a frame before ``min_rate`` applies.
    """

    budget: MemoryBudget
    frame_timeout: float = FRAME_TIMEOUT
    min_rate: float = MIN_TRANSFER_RATE
    rate_grace: float = RATE_GRACE

    def __post_init__(self) -> None:
        for name in ("frame_timeout", "min_rate", "rate_grace"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    def frame_deadline(self, started: float, received: int) -> float:
        """When a frame that started at ``started`` and has sent ``received`` bytes so far
        must be complete: the grace plus what ``min_rate`` allows for those bytes, never
        past ``frame_timeout``."""
        allowed = self.rate_grace + received / self.min_rate
        return started + min(self.frame_timeout, allowed)

"""The enclave's quota: an async counting semaphore that only the custodian's grants refill.

Theory of operation
-------------------
Every request takes its cost under the model's terms, ``k`` units at once, before it runs
(I9, I14) and ends in exactly one of two ways (I10): :meth:`Lease.commit` (an output was
produced: the ``k`` units are *served* and will be reported) or :meth:`Lease.release` (no
output: all ``k`` go back). The counters obey, at every instant::

    available + in_use + served_total + forfeited + returned_total == granted_total

``granted_total`` grows only through :meth:`Quota.grant` (and an upward :meth:`Quota.reset`),
so ``served_total + returned_total <= granted_total`` (I2, I20) whatever consumers do.

Returning units (:meth:`Quota.take_back`, for a clean stop or a custodian's recall) takes
only idle units, in one synchronous step: ``available`` ones, and none while a request is
parked (they are owed to it). Units held by a lease are never returnable.

The totals. ``granted_total`` and ``served_total`` are the enclave's own, kept here and
nowhere else: units enter only here and are served only here, so the law above holds by
construction. :mod:`.accounting` reads them: it turns the custodian's grants (totals) into
:meth:`Quota.grant` calls, and reports ``served_total`` to the custodian.

Parking. With fewer units available than it costs, a request parks until grants make up
its cost. Parked requests are queued per *client* (a key the caller gives: the consumer
server passes the peer's address without its port, :mod:`.consumer_server`), each client's
requests in order, and the clients in a rotation (R09). Units are *handed* to the head
client's oldest request only once all ``k`` it needs are there: they are counted
``in_use`` and the task is rescheduled in the same synchronous step; that client then goes
to the back of the rotation (if it has more parked), and the next client's oldest is served
the same way, and so on while the head's cost is covered. So a grant wakes as many parked
requests as the units cover (not one per unit), round-robin between clients: a client with
many connections and many parked requests is served one request per turn like any other,
and a client that parks behind it waits for at most one request of each client ahead of it
in the rotation. No request, however small, is served before the head (no barging): while
anyone is parked, ``available`` is less than the head's cost, and a request that arrives
then parks even if its own cost is available. A request never costs more than
:data:`~drm_wire.limits.MAX_GRANT_UNITS`, and no request within the terms costs more than
the custodian keeps an instance topped up to: its grant planner's *reserve* is the largest
cost one request can have (``drm_custodian.grants``, Q13), so a parked head always gets its
units once the requests running before it end.

A full park queue (``max_parked``) does not lock a client out either: a request from a
client holding fewer parked requests than the client holding the most pushes out that
client's newest parked request (which fails with ``BUSY``) and takes its place (R09). Only
a client that already holds the most parked requests (or as many as anyone) is refused.

Cancellation. A parked task that is cancelled (the consumer went away, or its own ``wait``
deadline passed) is removed from its client's queue by trio's abort callback, and trio
guarantees the abort callback and a reschedule are mutually exclusive. So there are only
two orders:

* cancel first: the task leaves the queue holding nothing; a later grant skips it (and if
  it was the head, the requests behind it are served at once if ``available`` covers them);
* grant first: the task already owns its units and its wake-up is a value, not a cancel.
  It returns its :class:`Lease` without another checkpoint, so the lease reaches the
  caller, whose next checkpoint raises ``Cancelled``; :meth:`Quota.take` then releases
  the lease and all its units go to the next parked tasks (or back to ``available``).
  Nothing is lost or counted twice. Callers of :meth:`Quota.acquire` must do the same with
  ``try/finally``.

Kill switch. :meth:`Quota.suspend` (custodian unreachable, or borrower blocked: I4, I13)
fails every parked request at once with that code, and every new request fails at once
until :meth:`Quota.resume`. A task that was handed a unit but had not run yet when the
switch fell gives the unit back and fails too: nothing starts while suspended. Leases
already running may still commit (that inference was taken before the switch; it must be
reported) or release. Suspension keeps ``available``: the count is still bounded by what
the custodian granted (P3: counts, never time), and a newly verified link decides what
survives, with ``resume(available=n)`` (or :meth:`Quota.reset`) setting the count the
custodian now vouches for; units dropped that way are counted in ``forfeited``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from typing import Final, final

import outcome
import trio

from drm_wire.errors import DrmError, ErrorCode
from drm_wire.limits import MAX_GRANT_UNITS, MAX_UINT, MAX_WAIT_SECONDS

__all__ = ["DEFAULT_MAX_PARKED", "Lease", "Quota", "QuotaError"]

#: Parked requests per quota (I12, R03). Each costs a task and a connection; 1,024 is far
#: above what one enclave serves while a grant is on its way, and small enough that a
#: flood of waiters cannot exhaust memory.
DEFAULT_MAX_PARKED: Final = 1024

_KILL_CODES: Final = frozenset({ErrorCode.CUSTODIAN_UNREACHABLE, ErrorCode.BLOCKED})
_LEASE_KEY: Final = object()


class QuotaError(DrmError):
    """An inference could not take a unit of quota.

    Attributes:
        code: why, as the consumer is told it (``NO_INFERENCES``, ``BUSY``, or the
            suspension code: ``CUSTODIAN_UNREACHABLE``, ``BLOCKED``).
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _check_count(value: object, name: str, *, low: int, high: int) -> int:
    if type(value) is not int:  # bool is an int subclass, and True units is a bug
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _check_wait(wait: float | None) -> float | None:
    if wait is None:
        return None
    if isinstance(wait, bool) or not isinstance(wait, int | float):
        raise TypeError(f"wait must be a number of seconds or None, not {type(wait).__name__}")
    if not 0 <= wait <= MAX_WAIT_SECONDS:  # NaN fails this too
        raise ValueError(f"wait must be in [0, {MAX_WAIT_SECONDS}], got {wait}")
    return float(wait)


@final
class Lease:
    """The units of quota held by one request (its cost); end it with :meth:`commit` or
    :meth:`release`.

    Only :meth:`Quota.acquire` makes leases, so holding one proves its units were taken.
    """

    __slots__ = ("_done", "_quota", "units")

    def __init__(self, quota: Quota, key: object, units: int = 1) -> None:
        if key is not _LEASE_KEY:
            raise TypeError("leases come from Quota.acquire() or Quota.take()")
        self._quota = quota
        self._done: str | None = None
        #: How many units the lease holds (the request's cost).
        self.units = units

    @property
    def held(self) -> bool:
        """Whether the lease is still open (neither committed nor released)."""
        return self._done is None

    def _finish(self, how: str) -> None:
        if self._done is not None:
            raise RuntimeError(f"lease already {self._done}")
        self._done = how
        self._quota._in_use -= self.units

    def commit(self) -> None:
        """The inference produced an output: count the lease's units as served.

        Call it as soon as the output exists (before sending it), so a cancellation
        after that point cannot return a unit that was used (Q08).

        Raises:
            RuntimeError: the lease was already committed or released.
        """
        self._finish("committed")
        self._quota._served_total += self.units
        self._quota._requests_served += 1

    def release(self) -> None:
        """The inference produced nothing: give the units back (to the waiters, in turn).

        Raises:
            RuntimeError: the lease was already committed or released.
        """
        self._finish("released")
        self._quota._give(self.units)

    def __repr__(self) -> str:
        return f"<Lease {self.units} {self._done or 'held'}>"


class Quota:
    """The enclave's inference quota, and its granted and served totals. See the module
    docstring for the rules.

    Args:
        max_parked: most requests that may wait at once; more get ``BUSY`` (I12).
    """

    def __init__(self, *, max_parked: int = DEFAULT_MAX_PARKED) -> None:
        self._max_parked = _check_count(max_parked, "max_parked", low=0, high=MAX_UINT)
        #: Parked requests per client, in the order each client parked them; the dict's
        #: order is the rotation (the head client is served next).
        self._queues: dict[Hashable, dict[trio.lowlevel.Task, int]] = {}
        self._client_of: dict[trio.lowlevel.Task, Hashable] = {}
        #: The costs of the parked requests, summed (what :attr:`shortfall` reads).
        self._parked_units = 0
        #: Called (synchronously, no arguments) whenever :attr:`shortfall` or
        #: :attr:`parked` may have changed: the custodian link's demand signal. It must
        #: not call back into the quota.
        self.demand_changed: Callable[[], object] | None = None
        self._available = 0
        self._in_use = 0
        self._served_total = 0
        self._requests_served = 0
        self._granted_total = 0
        self._forfeited = 0
        self._returned_total = 0
        self._suspended: ErrorCode | None = None
        #: What a refused request is told while suspended (say why, and what to do).
        self._suspended_message = "inferences are suspended"

    @property
    def available(self) -> int:
        """Units that may be taken now, without parking."""
        return self._available

    @property
    def parked(self) -> int:
        """Requests waiting for a unit."""
        return len(self._client_of)

    @property
    def parked_clients(self) -> int:
        """Clients with a request waiting for a unit (the length of the rotation)."""
        return len(self._queues)

    @property
    def in_use(self) -> int:
        """Units held by leases neither committed nor released yet."""
        return self._in_use

    @property
    def demand(self) -> int:
        """The cost of the request served next (the head client's oldest; 0 when none is
        parked): what the next grants must cover before anyone parked is served."""
        for queue in self._queues.values():
            return next(iter(queue.values()))
        return 0

    @property
    def shortfall(self) -> int:
        """Units the parked requests need beyond what is available: what this instance
        lacks to serve everyone waiting (0 when nobody is parked; at least 1 otherwise,
        since the head parks only while its cost is not covered)."""
        return max(self._parked_units - self._available, 0) if self._client_of else 0

    def _demand_moved(self) -> None:
        if self.demand_changed is not None:
            self.demand_changed()

    @property
    def served_total(self) -> int:
        """Units of leases committed, ever: the served total the enclave reports to the custodian
        (:meth:`Accounting.next_report <.accounting.Accounting.next_report>` reads it)."""
        return self._served_total

    @property
    def requests_served(self) -> int:
        """Leases committed, ever: the requests that ``served_total`` was served in."""
        return self._requests_served

    @property
    def granted_total(self) -> int:
        """Units granted, ever (grants plus upward resets): what a custodian grant's total
        is compared with (:meth:`Accounting.on_grant <.accounting.Accounting.on_grant>`)."""
        return self._granted_total

    @property
    def returned_total(self) -> int:
        """Units given back to the custodian, ever (:meth:`take_back`)."""
        return self._returned_total

    @property
    def forfeited(self) -> int:
        """Units dropped by a downward :meth:`reset`."""
        return self._forfeited

    @property
    def suspended(self) -> ErrorCode | None:
        """The kill-switch code while suspended, else None."""
        return self._suspended

    def __repr__(self) -> str:
        return (
            f"<Quota available={self._available} parked={len(self._client_of)} "
            f"in_use={self._in_use} served={self._served_total} "
            f"granted={self._granted_total} returned={self._returned_total} "
            f"suspended={self._suspended}>"
        )

    def grant(self, units: int) -> int:
        """Add ``units`` from a custodian grant; hand them to parked requests first, in order.

        Returns:
            How many parked requests were woken (in order, while their costs are covered).

        Raises:
            TypeError, ValueError: ``units`` is not an int in [1, MAX_GRANT_UNITS].
        """
        _check_count(units, "units", low=1, high=MAX_GRANT_UNITS)
        return self._add(units)

    def _add(self, units: int) -> int:
        self._granted_total += units
        return self._give(units)

    def _give(self, units: int) -> int:
        """Units that came in (granted or released): serve the parked, each client's oldest
        in turn, while the next one's whole cost is covered; the rest stays ``available``.
        Returns how many were woken."""
        self._available += units
        woken = self._serve_parked()
        if self._client_of:  # still short, by less: the custodian may hear the new figure
            self._demand_moved()
        return woken

    def _serve_parked(self) -> int:
        woken = 0
        queues = self._queues
        while queues and self._suspended is None:
            client, queue = next(iter(queues.items()))
            task, cost = next(iter(queue.items()))
            if cost > self._available:
                break  # the head waits for its whole cost; nobody behind it barges
            self._unpark(task)
            if queue:  # its turn is over: to the back of the rotation
                del queues[client]
                queues[client] = queue
            self._available -= cost
            self._in_use += cost  # the units are the task's from now on, even if it never runs
            trio.lowlevel.reschedule(task)
            woken += 1
        return woken

    def _park(self, task: trio.lowlevel.Task, client: Hashable, units: int) -> None:
        queue = self._queues.get(client)
        if queue is None:
            queue = self._queues[client] = {}  # a new client joins at the back
        queue[task] = units
        self._client_of[task] = client
        self._parked_units += units
        self._demand_moved()

    def _unpark(self, task: trio.lowlevel.Task) -> None:
        """Take ``task`` out of its client's queue (and the client out of the rotation
        once it has nothing parked)."""
        client = self._client_of.pop(task)
        queue = self._queues[client]
        self._parked_units -= queue.pop(task)
        if not queue:
            del self._queues[client]
        self._demand_moved()

    def _position(self, client: Hashable) -> int:
        """Where a request ``client`` parks now would be served (1-based), if nobody else
        parked meanwhile: one request per client per turn of the rotation."""
        own = self._queues.get(client)
        rank = 1 + (len(own) if own is not None else 0)  # its turn in the client's queue
        position = rank
        before = True  # clients ahead of it in the rotation get one turn more
        for other, queue in self._queues.items():
            if other == client:
                before = False
                continue
            position += min(len(queue), rank if before else rank - 1)
        return position

    def _push_out(self, client: Hashable) -> bool:
        """The park queue is full: fail the newest request of the client holding the most
        parked, if it holds more than ``client`` will once it parks. Returns whether room
        was made."""
        own = self._queues.get(client)
        mine = 1 + (len(own) if own is not None else 0)
        victim_client, victim_queue = max(self._queues.items(), key=lambda item: len(item[1]))
        if len(victim_queue) <= mine or victim_client == client:
            return False
        task = next(reversed(victim_queue))
        self._unpark(task)
        error = QuotaError(
            ErrorCode.BUSY, "too many requests are waiting for inferences; pushed out"
        )
        trio.lowlevel.reschedule(task, outcome.Error(error))
        return True

    def _lease_for_woken(self, units: int) -> Lease:
        """Turn the units this task holds into a lease, unless the switch fell meanwhile."""
        if self._suspended is not None:
            self._in_use -= units
            self._give(units)
            raise QuotaError(self._suspended, self._suspended_message)
        return Lease(self, _LEASE_KEY, units)

    def try_acquire(self, units: int = 1) -> Lease | None:
        """Take ``units`` if they are free now and nobody is parked, without parking or a
        schedule point.

        For a caller that will not wait anyway (the consumer server's inline fast path).
        It never jumps the queue: with anyone parked it returns ``None``.

        Returns:
            The lease, or ``None`` when no unit is free.

        Raises:
            QuotaError: the suspension code (``CUSTODIAN_UNREACHABLE``, ``BLOCKED``).
        """
        _check_count(units, "units", low=1, high=MAX_GRANT_UNITS)
        if self._suspended is not None:
            raise QuotaError(self._suspended, self._suspended_message)
        if self._client_of or self._available < units:
            return None
        self._available -= units
        self._in_use += units
        return Lease(self, _LEASE_KEY, units)

    async def acquire(
        self,
        wait: float | None = None,
        *,
        units: int = 1,
        on_parked: Callable[[int], object] | None = None,
        client: Hashable = None,
    ) -> Lease:
        """Take ``units`` at once (a request's cost), parking until they are there (in
        ``client``'s queue, served round-robin with other clients).

        The caller owns the returned lease and must end it on every path (``try/finally``);
        :meth:`take` does that for you.

        Args:
            wait: ``0``: do not park; ``N``: park at most N seconds; ``None``: park until a
                grant (or the kill switch) comes.
            units: the request's cost, 1 to ``MAX_GRANT_UNITS``; all taken or none.
            on_parked: called once, synchronously, with the request's 1-based position in
                the queue when it parks (where the rotation would serve it if nobody else
                parked), so the caller can tell its consumer it is waiting.
                It must not block or call back into the quota (use ``send_nowait`` on a
                channel, or set an event).

        Raises:
            QuotaError: ``NO_INFERENCES`` (none left within ``wait``), ``BUSY`` (too many
                parked already), or the suspension code (``CUSTODIAN_UNREACHABLE``,
                ``BLOCKED``).
            client: who the request is for, as far as fairness goes: parked requests are
                served one per client per turn (any hashable; ``None`` is one client).
            TypeError, ValueError: ``wait`` is not None or a number in [0, MAX_WAIT_SECONDS],
                or ``units`` out of range.
        """
        deadline_in = _check_wait(wait)
        _check_count(units, "units", low=1, high=MAX_GRANT_UNITS)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._suspended is not None:
            raise QuotaError(self._suspended, self._suspended_message)
        if not self._client_of and self._available >= units:
            self._available -= units
            self._in_use += units
            await trio.lowlevel.cancel_shielded_checkpoint()  # a schedule point; never loses it
            return self._lease_for_woken(units)
        if deadline_in == 0:
            raise QuotaError(ErrorCode.NO_INFERENCES, "no inferences left")
        if len(self._client_of) >= self._max_parked and not (
            self._client_of and self._push_out(client)
        ):
            raise QuotaError(ErrorCode.BUSY, "too many requests are waiting for inferences")
        task = trio.lowlevel.current_task()
        if on_parked is not None:
            on_parked(self._position(client))
        self._park(task, client, units)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._unpark(task)  # still parked, so nothing was handed to us
            self._serve_parked()  # the head left: who is behind it may be covered now
            return trio.lowlevel.Abort.SUCCEEDED

        if deadline_in is None:  # (no cancel scope: a sizeable share of a wake-up's cost)
            await trio.lowlevel.wait_task_rescheduled(abort)
            return self._lease_for_woken(units)  # no checkpoint before the caller has it
        with trio.move_on_after(deadline_in):
            await trio.lowlevel.wait_task_rescheduled(abort)
            return self._lease_for_woken(units)
        raise QuotaError(ErrorCode.NO_INFERENCES, f"no inferences left after {wait} s")

    @asynccontextmanager
    async def take(
        self,
        wait: float | None = None,
        *,
        units: int = 1,
        on_parked: Callable[[int], object] | None = None,
        client: Hashable = None,
    ) -> AsyncIterator[Lease]:
        """``async with quota.take(wait) as lease:`` around one inference.

        On a normal exit an open lease is committed; on any exception (a failed inference,
        ``Cancelled``) it is released, so the unit is never lost (I10). Commit explicitly as
        soon as the output exists if the block goes on to do more (send the result).
        Arguments and errors are those of :meth:`acquire`.
        """
        lease = await self.acquire(wait, units=units, on_parked=on_parked, client=client)
        try:
            yield lease
        except BaseException:
            if lease.held:
                lease.release()
            raise
        if lease.held:
            lease.commit()

    def take_back(self, units: int | None = None) -> int:
        """Take up to ``units`` idle units (all of them with ``None``) out of the quota, to
        return them to the custodian; returns how many were taken.

        Idle means ``available`` while nobody is parked: a parked request is owed the
        units that gather for it, and units of a running request are never idle. One
        synchronous step, so no request takes a unit that is being returned (I20).

        Raises:
            TypeError, ValueError: ``units`` is not None or an int in [1, MAX_GRANT_UNITS].
        """
        if units is not None:
            _check_count(units, "units", low=1, high=MAX_GRANT_UNITS)
        idle = 0 if self._client_of else self._available
        taken = idle if units is None else min(units, idle)
        self._available -= taken
        self._returned_total += taken
        return taken

    def suspend(self, code: ErrorCode, message: str = "inferences are suspended") -> int:
        """Throw the kill switch: fail every parked request with ``code``, refuse new ones;
        each is told ``message``.

        Returns:
            How many parked requests were failed.

        Raises:
            ValueError: ``code`` is not ``CUSTODIAN_UNREACHABLE`` or ``BLOCKED``.
        """
        if code not in _KILL_CODES:
            raise ValueError(f"cannot suspend with {code!r}")
        self._suspended, self._suspended_message = code, message
        failed = 0
        while self._client_of:
            task = next(iter(self._client_of))
            self._unpark(task)
            error = QuotaError(code, message)
            trio.lowlevel.reschedule(task, outcome.Error(error))
            failed += 1
        return failed

    def resume(self, *, available: int | None = None) -> None:
        """Lift the kill switch once a verified custodian link is back.

        Args:
            available: ``None`` keeps the units held through the suspension; a number sets
                ``available`` to what the custodian now vouches for (see :meth:`reset`).
        """
        if available is not None:
            self.reset(available)
        self._suspended = None
        self._serve_parked()  # (none are parked: suspend failed them all; kept for safety)

    def reset(self, units: int) -> None:
        """Set ``available`` to exactly ``units`` (a resync with the custodian).

        Units added count as granted (and wake parked requests); units removed are
        ``forfeited``. Leases in use are untouched.
        """
        _check_count(units, "units", low=0, high=MAX_UINT)
        if units >= self._available:
            self._add(units - self._available)
        else:
            self._forfeited += self._available - units
            self._available = units

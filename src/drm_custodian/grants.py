"""The grant planner: how many inferences to lend an enclave instance now (sans-IO, pure).

Theory of operation
-------------------
The custodian lends each enclave instance a *lease* of inferences at a time instead of the
whole remaining supply, so that a lost instance strands at most one lease (P2: a grant is
a loan that stays charged until it is reported served) and several instances of one
borrower share the supply. An instance's *outstanding* units are what it was granted and
has not reported served: ``granted_total - served_total``. The planner tops the instance
up to a full lease once outstanding drops below half a lease, so a busy enclave gets its
next grant while it still has half a lease to serve from, and never waits on the round
trip. It never grants beyond the borrower's remaining supply, nothing to a blocked
borrower, and at most :data:`~drm_wire.limits.MAX_GRANT_UNITS` at once.

A request of ``k`` items takes ``k`` units at once (I14), and the enclave's queue is FIFO:
a parked request for more than the instance holds waits for a grant, and everything
behind it waits too. With the half-lease rule alone, a request costing more than half a
lease could park forever (outstanding at, say, 60% of the lease: no top-up, and not
enough to serve it; Q13). So the planner also tops up whenever outstanding is below the
*reserve*: the largest cost one request can have under the terms of the models lent
(:attr:`~drm_wire.model.terms.Pricing.max_cost`, at most the lease, which ``serve``
checks). Once the in-flight requests end, an instance then holds at least the reserve,
which covers any request, whatever the head of its queue costs.

Version 4: an instance whose enclave says requests are parked there (its *demand*) is
topped up to a full lease at once, whatever it holds: the half-lease rule waits for usage
reports, a parked request should not. The lease still caps what it may hold, so a demand
that lies draws no more than an honest busy instance (I24).

No I/O, no clock, no logging: the session reads the numbers from the ledger, asks
:func:`plan_grant`, and records and sends what it answers.
"""

from __future__ import annotations

from typing import Final

from drm_wire.limits import MAX_GRANT_UNITS

__all__ = ["DEFAULT_LEASE", "check_lease", "plan_grant"]

#: Units lent to one instance at a time. 1,000 inferences last a CPU enclave from seconds
#: (tiny models) to minutes (a CNN), so top-ups are rare, and a lost instance strands at
#: most this many units.
DEFAULT_LEASE: Final = 1000


def check_lease(lease: int) -> int:
    """Return ``lease`` if it is a valid lease size (an int in 1..MAX_GRANT_UNITS).

    Raises:
        ValueError: it is not.
    """
    if type(lease) is not int or not 1 <= lease <= MAX_GRANT_UNITS:
        raise ValueError(f"lease must be an integer between 1 and {MAX_GRANT_UNITS}")
    return lease


def plan_grant(
    *,
    remaining: int,
    granted_total: int,
    served_total: int,
    lease: int = DEFAULT_LEASE,
    blocked: bool = False,
    reserve: int = 1,
    need: int = 0,
) -> int:
    """How many units to grant an instance now; 0 means "no grant".

    Args:
        remaining: the borrower's supply not yet granted to any instance.
        granted_total: units granted to this instance so far (the ledger's cumulative).
        served_total: units this instance reported served and the ledger recorded.
        lease: the most units an instance may hold outstanding.
        blocked: the borrower is blocked: nothing is granted.
        reserve: the largest cost of one request (1 to ``lease``): outstanding below it
            is topped up even when it is half a lease or more.
        need: units the instance's parked requests lack (its demand, version 4): an
            instance with demand is topped up to its lease whatever it holds, never
            beyond (a demand is a claim, I24).

    Returns:
        ``0`` while outstanding (``granted_total - served_total``) is at least half a
        lease and at least ``reserve``; otherwise ``lease - outstanding``, cut to
        ``remaining`` and to
        ``MAX_GRANT_UNITS``. So ``granted_total + result - served_total <= lease`` and
        ``result <= max(remaining, 0)`` always hold.

    Raises:
        ValueError: ``lease`` or ``reserve`` is out of range, or a count is negative.
    """
    check_lease(lease)
    if type(reserve) is not int or not 1 <= reserve <= lease:
        raise ValueError("reserve must be an integer from 1 to the lease")
    if min(granted_total, served_total, need) < 0:
        raise ValueError("granted_total, served_total and need must not be negative")
    if blocked or remaining <= 0:
        return 0
    # An instance that reported more than it was granted (a broken invariant the ledger
    # flags) holds nothing: count it as empty rather than as owed.
    outstanding = max(granted_total - served_total, 0)
    if outstanding >= lease or (2 * outstanding >= lease and outstanding >= reserve and not need):
        return 0
    return min(lease - outstanding, remaining, MAX_GRANT_UNITS)

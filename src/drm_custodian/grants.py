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
) -> int:
    """How many units to grant an instance now; 0 means "no grant".

    Args:
        remaining: the borrower's supply not yet granted to any instance.
        granted_total: units granted to this instance so far (the ledger's cumulative).
        served_total: units this instance reported served and the ledger recorded.
        lease: the most units an instance may hold outstanding.
        blocked: the borrower is blocked: nothing is granted.

    Returns:
        ``0`` while outstanding (``granted_total - served_total``) is at least half a
        lease; otherwise ``lease - outstanding``, cut to ``remaining`` and to
        ``MAX_GRANT_UNITS``. So ``granted_total + result - served_total <= lease`` and
        ``result <= max(remaining, 0)`` always hold.

    Raises:
        ValueError: ``lease`` is out of range, or a count is negative.
    """
    check_lease(lease)
    if min(granted_total, served_total) < 0:
        raise ValueError("granted_total and served_total must not be negative")
    if blocked or remaining <= 0:
        return 0
    # An instance that reported more than it was granted (a broken invariant the ledger
    # flags) holds nothing: count it as empty rather than as owed.
    outstanding = max(granted_total - served_total, 0)
    if 2 * outstanding >= lease:
        return 0
    return min(lease - outstanding, remaining, MAX_GRANT_UNITS)

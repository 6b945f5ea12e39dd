"""Which enclave instances are linked now, one per license, and the admin API's hooks.

Theory of operation
-------------------
A license may have one live enclave instance at a time (docs/links.md, step 2). A
session *claims* its license after the license check and *releases* it when it ends:

* no live session for the license: the claim succeeds;
* a live session of *another* instance: :class:`DuplicateInstance`; the caller sends
  ``error(duplicate_instance)`` and closes, and the first instance keeps serving;
* a live session of the *same* instance: that instance dialled again, so its old link is
  dead even if no missed heartbeat has said so yet (an enclave process holds one link, and
  its instance id is chosen inside the enclave). The old session is closed, and the claim
  waits for it to end before succeeding, so the two never act on the ledger for one
  instance at the same time.

The registry is also how the admin API reaches the links: :class:`SessionHooks` names
the borrower's ready sessions and their grant rule, so that a supply commits their grants
in its own transaction, then hands each session its grant; it wakes every live session of
the borrower when the borrower is blocked or unblocked, and any that a supply did not
grant to; each session then reads the ledger and acts (the hooks themselves do no I/O).

For the owner's write-off of a lost instance (I21) the registry remembers when each
instance's last session ended (a session sends only while it runs, so that bounds the
last byte sent to it) and when this process started (it sent nothing before):
:meth:`Registry.silent_for` is how long the custodian has sent an instance nothing.
Those end times are kept only while they matter: once an instance has been silent for
longer than ``forget_after`` (the reclaim window) its entry is dropped, and it reads as
ended when this process started. That only makes its silence look longer, and it was
already past the window, so every answer (reclaimable or not) stays the same, while a
custodian that runs for months keeps end times for the instances of the last window
only, not for every instance it ever linked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Final, Protocol

import trio

from drm_custodian.ledger import Grant, GrantPlan, SupplyResult
from drm_wire.errors import DrmError

__all__ = [
    "DEFAULT_BLOCK_REASON",
    "GRANT_SEND_WAIT",
    "SUPERSEDE_TIMEOUT",
    "DuplicateInstance",
    "LiveSession",
    "Registry",
    "SessionHooks",
]

#: How long a reconnecting instance waits for its old session to end. Closing a session
#: is a cancellation plus a forceful close: milliseconds. A bound keeps a stuck old
#: session from holding the new one forever.
SUPERSEDE_TIMEOUT: Final = 5.0

#: How long a supply's HTTP answer waits for its grants to be sent (a link that cannot
#: take a small frame this fast is failing, and its grant stays charged either way).
GRANT_SEND_WAIT: Final = 0.25

#: What a block message says when the daemon does not know the operator's reason (the
#: block was made before this process started).
DEFAULT_BLOCK_REASON: Final = "blocked by the model owner"


class DuplicateInstance(DrmError):
    """Another instance already holds this license on a live link."""


class LiveSession(Protocol):
    """What the registry needs of a session."""

    @property
    def borrower(self) -> str: ...
    @property
    def license_id(self) -> str: ...
    @property
    def instance_id(self) -> str: ...
    @property
    def finished(self) -> trio.Event: ...
    @property
    def ready(self) -> bool:
        """Its models are delivered: grants may flow."""

    @property
    def grant_plan(self) -> GrantPlan: ...
    def wake(self) -> None:
        """Re-read the ledger soon: push a block, an unblock or a grant if one is due."""

    def grant_committed(self, grant: Grant, remaining: int) -> None:
        """Send ``grant``, already durable, soon (``remaining``: the supply left after it)."""

    async def wait_sent(self, granted_total: int) -> None:
        """Return once the instance was sent ``granted_total`` or more, or the session ended."""

    def close(self) -> None:
        """End the session now (its link is closed as it unwinds)."""


class Registry:
    """The live sessions, by license."""

    def __init__(self, *, started_at: float | None = None, forget_after: float = math.inf) -> None:
        self._by_license: dict[str, LiveSession] = {}
        self._block_reasons: dict[str, str] = {}
        #: When this process started (trio's clock): nothing was sent before it.
        self._started_at = trio.current_time() if started_at is None else started_at
        #: When the last session of each instance ended, oldest first, for instances
        #: that ended within ``forget_after`` (see the module docstring).
        self._ended_at: dict[str, float] = {}
        if not forget_after >= 0:  # NaN fails this too
            raise ValueError(f"forget_after must be a number of seconds >= 0, not {forget_after}")
        self._forget_after = forget_after
        #: Set when a session ends (the reclaim watcher then looks again).
        self._ended = trio.Event()

    def __repr__(self) -> str:
        return f"<Registry live={len(self._by_license)}>"

    async def claim(self, session: LiveSession) -> None:
        """Make ``session`` the live one for its license.

        Raises:
            DuplicateInstance: another instance holds the license.
            trio.TooSlowError: an old session of the same instance did not end in time.
        """
        while (current := self._by_license.get(session.license_id)) is not None:
            if current is session:
                return
            if current.instance_id != session.instance_id:
                raise DuplicateInstance("another enclave instance holds this license")
            current.close()
            with trio.fail_after(SUPERSEDE_TIMEOUT):
                await current.finished.wait()
            if self._by_license.get(session.license_id) is current:
                del self._by_license[session.license_id]
        self._by_license[session.license_id] = session

    def release(self, session: LiveSession) -> None:
        """Forget ``session`` if it is the live one (idempotent); note when it ended."""
        now = trio.current_time()
        self._ended_at.pop(session.instance_id, None)  # re-inserted last: oldest first
        self._ended_at[session.instance_id] = now
        self._forget_silent(now)
        self._ended.set()
        self._ended = trio.Event()
        if self._by_license.get(session.license_id) is session:
            del self._by_license[session.license_id]

    def _forget_silent(self, now: float) -> None:
        """Drop the end times of instances silent for longer than ``forget_after``."""
        ended = self._ended_at
        while ended:
            instance, at = next(iter(ended.items()))
            if now - at <= self._forget_after:
                break
            del ended[instance]

    @property
    def remembered(self) -> int:
        """How many end times are kept (instances that ended within ``forget_after``)."""
        return len(self._ended_at)

    def live_instances(self, borrower: str) -> set[str]:
        return {s.instance_id for s in self._by_license.values() if s.borrower == borrower}

    @property
    def started_at(self) -> float:
        return self._started_at

    def ended_at(self, instance_id: str) -> float:
        """When the custodian last could have sent ``instance_id`` anything (trio's clock)."""
        return max(self._started_at, self._ended_at.get(instance_id, self._started_at))

    async def wait_ended(self) -> None:
        """Return once some session ends."""
        await self._ended.wait()

    def silent_for(self, borrower: str, instance_id: str) -> float | None:
        """Seconds since the custodian last could have sent ``instance_id`` anything, or
        ``None`` while it has a live session."""
        if instance_id in self.live_instances(borrower):
            return None
        return trio.current_time() - self.ended_at(instance_id)

    def sessions(self, borrower: str) -> Iterator[LiveSession]:
        """The live sessions of ``borrower``."""
        return iter([s for s in self._by_license.values() if s.borrower == borrower])

    def count(self, borrower: str) -> int:
        return sum(1 for s in self._by_license.values() if s.borrower == borrower)

    def close_all(self) -> None:
        """Close every live session (shutdown)."""
        for session in list(self._by_license.values()):
            session.close()

    def set_block_reason(self, borrower: str, reason: str) -> None:
        self._block_reasons[borrower] = reason

    def block_reason(self, borrower: str) -> str:
        """The operator's reason for the borrower's block, as far as this process knows."""
        return self._block_reasons.get(borrower) or DEFAULT_BLOCK_REASON

    def wake(self, borrower: str) -> None:
        for session in self.sessions(borrower):
            session.wake()


class SessionHooks:
    """The daemon's :class:`~drm_custodian.admin.AdminHooks`: wakes the borrower's sessions.

    The admin API calls these after its ledger commit. Each wakes sessions and returns at
    once, but for :meth:`on_supplied`, which also waits (at most :data:`GRANT_SEND_WAIT`)
    until the supply's grants are on the wire: the HTTP answer is then written after them
    instead of competing with them for the CPU, and a parked request resumes sooner.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def grant_plans(self, borrower: str) -> list[tuple[str, GrantPlan]]:
        return [(s.instance_id, s.grant_plan) for s in self._registry.sessions(borrower) if s.ready]

    async def on_supplied(self, borrower: str, result: SupplyResult) -> None:
        granted = {grant.instance_id: grant for grant in result.grants}
        remaining = result.balance.remaining
        for session in self._registry.sessions(borrower):
            grant = granted.get(session.instance_id)
            if grant is None:  # not ready when the plans were taken, say: let it look
                session.wake()
            else:
                session.grant_committed(grant, remaining)
        with trio.move_on_after(GRANT_SEND_WAIT):
            for session in self._registry.sessions(borrower):
                if (grant := granted.get(session.instance_id)) is not None:
                    await session.wait_sent(grant.cumulative)

    async def on_blocked(self, borrower: str, reason: str) -> None:
        self._registry.set_block_reason(borrower, reason)
        self._registry.wake(borrower)

    async def on_unblocked(self, borrower: str) -> None:
        self._registry.wake(borrower)

    def instances(self, borrower: str) -> int:
        return self._registry.count(borrower)

    def live_instances(self, borrower: str) -> set[str]:
        return self._registry.live_instances(borrower)

    def silent_for(self, borrower: str, instance_id: str) -> float | None:
        return self._registry.silent_for(borrower, instance_id)

    async def on_reclaimed(self, borrower: str) -> None:
        self._registry.wake(borrower)  # units came back to the supply

"""Which enclave instances are linked now, up to a cap per license, and the admin API's hooks.

Theory of operation
-------------------
A license admits up to its record's ``max_instances`` live enclave instances at once
(docs/links.md, step 2; 1 unless the owner said more). A session *claims* its license
after the license check and *releases* it when it ends:

* fewer live sessions for the license than its cap: the claim succeeds;
* as many as the cap, none of them of this instance: :class:`InstanceLimit` (a
  :class:`DuplicateInstance`); the caller sends ``error(duplicate_instance)`` naming the
  cap and closes, and the live instances keep serving (I23);
* a live session of the *same* instance: that instance dialled again, so its old link is
  dead even if no missed heartbeat has said so yet (an enclave process holds one link, and
  its instance id is chosen inside the enclave). The old session is closed, and the claim
  waits for it to end before succeeding, so the two never act on the ledger for one
  instance at the same time. A reconnection never counts against the cap.

Several instances of one borrower share its supply through the ledger alone: every grant
is planned and committed in one ledger transaction against the borrower's remaining
supply (``Ledger.grant_due``, ``Ledger.supply``), so grants to any number of instances
never exceed what was supplied, whatever order their pumps run in (I1, I23). A supply
plans its grants for the instances whose parked requests lack units first (their demand,
version 4), then for those holding least (:meth:`SessionHooks.grant_plans`), so a supply
too small for every due top-up reaches where requests wait before one that still holds
units.

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
from typing import Any, Final, Protocol

import trio

from drm_custodian.ledger import Grant, GrantPlan, SupplyResult
from drm_wire.errors import DrmError

__all__ = [
    "DEFAULT_BLOCK_REASON",
    "GRANT_SEND_WAIT",
    "SUPERSEDE_TIMEOUT",
    "DuplicateInstance",
    "InstanceLimit",
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
    """Other instances already hold this license on live links."""


class InstanceLimit(DuplicateInstance):
    """The license's cap of live instances is reached (``max_instances`` are live)."""

    def __init__(self, max_instances: int) -> None:
        self.max_instances = max_instances
        noun = "instance" if max_instances == 1 else "instances"
        super().__init__(
            f"this license admits {max_instances} live enclave {noun} and "
            f"{max_instances} {'is' if max_instances == 1 else 'are'} linked"
        )


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
    @property
    def outstanding(self) -> int:
        """Units it was sent and has not reported served: what it holds, as far as known."""

    @property
    def recall_pending(self) -> bool:
        """A ``recall`` it was sent is unanswered."""

    @property
    def recall_dry(self) -> bool:
        """Its last recall returned nothing, and it reported no usage since."""

    @property
    def parked_requests(self) -> int:
        """Requests parked on it, by its latest demand (version 4)."""

    @property
    def need(self) -> int:
        """Units its parked requests lack, less what it was granted since it said so."""

    @property
    def told_blocked(self) -> bool:
        """It was last sent ``block``."""

    @property
    def block_acknowledged(self) -> bool:
        """It acknowledged the block it was last sent (I25)."""

    def recall(self, units: int, asker: Any = None) -> bool:
        """Ask the enclave soon to give back up to ``units`` idle units for ``asker``;
        whether it will be asked (one recall at a time)."""

    def wake(self) -> None:
        """Re-read the ledger soon: push a block, an unblock or a grant if one is due."""

    def grant_committed(self, grant: Grant, remaining: int) -> None:
        """Send ``grant``, already durable, soon (``remaining``: the supply left after it)."""

    async def wait_sent(self, granted_total: int) -> None:
        """Return once the instance was sent ``granted_total`` or more, or the session ended."""

    def close(self) -> None:
        """End the session now (its link is closed as it unwinds)."""


class Registry:
    """The live sessions, by license and instance."""

    def __init__(self, *, started_at: float | None = None, forget_after: float = math.inf) -> None:
        #: license id -> instance id -> its live session (insertion order: link order).
        self._by_license: dict[str, dict[str, LiveSession]] = {}
        self._block_reasons: dict[str, str] = {}
        #: borrower -> the licenses its sessions ever claimed (one, unless it was removed
        #: and added again): a borrower's sessions without a walk over every link.
        self._licenses_of: dict[str, set[str]] = {}
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
        #: Set when an instance acknowledges a block (an admin block may wait for them).
        self._acked = trio.Event()

    def __repr__(self) -> str:
        return f"<Registry live={sum(len(live) for live in self._by_license.values())}>"

    def _all(self) -> list[LiveSession]:
        return [s for live in self._by_license.values() for s in live.values()]

    async def claim(self, session: LiveSession, *, max_instances: int = 1) -> None:
        """Make ``session`` a live one for its license, which admits ``max_instances``.

        Raises:
            InstanceLimit: ``max_instances`` other instances hold the license.
            trio.TooSlowError: an old session of the same instance did not end in time.
        """
        if type(max_instances) is not int or max_instances < 1:
            raise ValueError("max_instances must be a positive integer")
        while (current := self._live(session.license_id).get(session.instance_id)) is not None:
            if current is session:
                return
            current.close()
            with trio.fail_after(SUPERSEDE_TIMEOUT):
                await current.finished.wait()
            self._forget(current)
        # Checked after any wait above, with no await before the insert: two claims racing
        # for the last place cannot both take it.
        live = self._live(session.license_id)
        if len(live) >= max_instances:
            raise InstanceLimit(max_instances)
        self._by_license[session.license_id] = {**live, session.instance_id: session}
        self._licenses_of.setdefault(session.borrower, set()).add(session.license_id)

    def _live(self, license_id: str) -> dict[str, LiveSession]:
        return self._by_license.get(license_id, {})

    def _forget(self, session: LiveSession) -> None:
        live = self._by_license.get(session.license_id)
        if live is not None and live.get(session.instance_id) is session:
            del live[session.instance_id]
            if not live:
                del self._by_license[session.license_id]

    def release(self, session: LiveSession) -> None:
        """Forget ``session`` if it is the live one (idempotent); note when it ended."""
        now = trio.current_time()
        self._ended_at.pop(session.instance_id, None)  # re-inserted last: oldest first
        self._ended_at[session.instance_id] = now
        self._forget_silent(now)
        self._ended.set()
        self._ended = trio.Event()
        self._forget(session)

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
        return {s.instance_id for s in self._all() if s.borrower == borrower}

    def license_instances(self, license_id: str) -> int:
        """How many instances hold ``license_id`` on live links now."""
        return len(self._by_license.get(license_id, {}))

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
        return iter(
            [
                s
                for license_id in sorted(self._licenses_of.get(borrower, ()))
                for s in self._live(license_id).values()
                if s.borrower == borrower
            ]
        )

    def recall_donors(self, borrower: str, asking: str) -> list[LiveSession]:
        """The live, ready instances of ``borrower`` other than ``asking`` that may be
        asked to give units back (I24), holding most first: they hold some, have no
        request parked (units held for one's own waiting requests are not idle), no
        recall unanswered, and did not answer their last recall with nothing since
        they last reported usage."""
        donors = [
            s
            for s in self.sessions(borrower)
            if s.instance_id != asking
            and s.ready
            and s.outstanding > 0
            and not s.parked_requests
            and not s.recall_pending
            and not s.recall_dry
        ]
        return sorted(donors, key=lambda s: s.outstanding, reverse=True)

    def need(self, borrower: str, excluding: str) -> int:
        """Units the borrower's live instances other than ``excluding`` lack for their
        parked requests: what a grant to an instance without demand leaves for them."""
        return sum(s.need for s in self.sessions(borrower) if s.instance_id != excluding)

    def wake_needy(self, borrower: str, excluding: str) -> None:
        """Wake the borrower's instances whose parked requests lack units: another
        instance may now give some (its own requests ended, or it holds idle ones)."""
        for session in self.sessions(borrower):
            if session.instance_id != excluding and session.need:
                session.wake()

    def block_acknowledged(self, borrower: str) -> None:
        """An instance of ``borrower`` acknowledged its block: wake whoever waits."""
        self._acked.set()
        self._acked = trio.Event()

    def block_acks(self, borrower: str) -> dict[str, bool]:
        """For each live instance of ``borrower``, whether it acknowledged the block it
        was last sent (``False`` also while it was sent none)."""
        return {
            s.instance_id: s.told_blocked and s.block_acknowledged for s in self.sessions(borrower)
        }

    async def wait_block_acked(self, borrower: str, seconds: float) -> None:
        """Return once every live instance of ``borrower`` acknowledged its block, or
        after ``seconds``."""
        with trio.move_on_after(seconds):
            while not all(self.block_acks(borrower).values()):
                await self._acked.wait()

    def count(self, borrower: str) -> int:
        return sum(1 for s in self._all() if s.borrower == borrower)

    def close_all(self) -> None:
        """Close every live session (shutdown)."""
        for session in self._all():
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
        """The ready sessions' grant rules: those whose parked requests lack units first
        (I24), then the emptiest: a supply too small for every due top-up goes first to
        where requests wait, then to the instances holding least, then in link order."""
        ready = [s for s in self._registry.sessions(borrower) if s.ready]
        ready.sort(key=lambda s: (not s.need, s.outstanding))  # stable: ties keep link order
        return [(s.instance_id, s.grant_plan) for s in ready]

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

    def block_acks(self, borrower: str) -> dict[str, bool]:
        return self._registry.block_acks(borrower)

    async def wait_block_acked(self, borrower: str, seconds: float) -> None:
        await self._registry.wait_block_acked(borrower, seconds)

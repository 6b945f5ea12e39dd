"""A stand-in for :class:`~drm_custodian.session.EnclaveSession` as the registry sees it
(:class:`~drm_custodian.registry.LiveSession`): the fields it reads, and a record of what
it asked of the session."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from drm_custodian.ledger import Balance, Grant


@dataclass(eq=False)
class FakeSession:
    borrower: str
    license_id: str
    instance_id: str
    finished: trio.Event = field(default_factory=trio.Event)
    woken: int = 0
    closed: bool = False
    ready: bool = True
    outstanding: int = 0
    recall_pending: bool = False
    recall_dry: bool = False
    parked_requests: int = 0
    need: int = 0
    told_blocked: bool = False
    block_acknowledged: bool = False
    #: What its grant plan answers, whatever the balance.
    plan_units: int = 1
    recalled: list[int] = field(default_factory=list)
    committed: list[tuple[Grant, int]] = field(default_factory=list)
    waited_for: list[int] = field(default_factory=list)

    def recall(self, units: int, asker: object = None) -> bool:
        self.recalled.append(units)
        return True

    def grant_plan(self, balance: Balance, granted: int, served: int) -> int:
        return self.plan_units

    def wake(self) -> None:
        self.woken += 1

    def grant_committed(self, grant: Grant, remaining: int) -> None:
        self.committed.append((grant, remaining))

    async def wait_sent(self, granted_total: int) -> None:
        self.waited_for.append(granted_total)

    def close(self) -> None:
        self.closed = True

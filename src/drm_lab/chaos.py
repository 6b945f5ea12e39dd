"""A seeded fault campaign against real processes, and a checker that proves the ledger.

Theory of operation
-------------------
:class:`Campaign` runs a custodian lending to :attr:`Topology.borrowers` borrowers (added
through the admin API, each with its own license file and ``max_instances``) and, per
borrower, :attr:`Topology.enclaves` enclave processes (:class:`~drm_lab.deployment.Lab`)
started on that borrower's license, each enclave dialling the custodian through its own
loopback :class:`~drm_lab.faults.FaultProxy`. The borrower ``init`` made is lent nothing
and runs no enclave: nothing may ever be charged to it. Consumer tasks
(:class:`drm_consumer.Client`, the real client) hammer every enclave for the whole run and
record, per enclave instance, the units charged in the answers they got and the requests
whose outcome they never learnt (the connection failed under them).

One step draws a fault from ``random.Random(seed)`` (:data:`WEIGHTS`) and the enclave slot
it hits (a slot is one enclave position of one borrower: its proxy and its current
process), applies it and then runs the checker. Faults on the ledger (supply, block,
unblock, reclaim) act on the slot's borrower through the per-borrower admin routes;
``concurrent`` kills (-9) one slot's enclave while it supplies another borrower (the
same one when there is only one). The draw and its parameters are reproducible for a
seed; whether a drawn fault *counts* depends on the state it meets: only a fault that
changed a process (kill -9 or SIGTERM of an enclave or the custodian, a restart) or a
link (a silent partition, a delay, a cut), or the ledger's state (supply, block, unblock,
reclaim) is counted, and the
campaign draws until ``faults`` have counted.

The checker (:meth:`Campaign.check`) reads the ledger file after every step, read-only and
in one read transaction (:func:`read_ledger`: one snapshot, recomputed from the
append-only records and compared with the totals the ledger's triggers keep), and compares
it with what the consumers saw and what the owner supplied
(docs/invariants.md I1, I2, I5, I13, I20, I21, I22, I23):

* per borrower: ``served + in_doubt + returned + reclaimed == granted``,
  ``served <= granted - returned - reclaimed <= supplied`` and
  ``supplied + returned + reclaimed == granted + remaining``; the instance rows add up to
  the borrower's totals; no total ever goes down between two checks; ``supplied`` is
  what the campaign supplied to that borrower;
* every answer is covered: per instance, the units the consumers were charged are at most
  ``served + in_doubt + reclaimed`` (the consumers' count is taken *before* the ledger is
  read, so an answer counted was served before the read); for an instance that stopped
  cleanly, and at the end for every instance never killed, ``answers <= served <=
  answers + lost`` (equality when no request was lost in flight; a request still
  waiting for its answer counts as lost until it has one, and each request of the tiny
  model costs one unit);
* nothing starts after a block is applied: from an instance's block point
  (:meth:`Campaign._block_point`: the log line that says the block reached it) until the
  owner unblocks, no request that a consumer started there may succeed;
* no borrower is charged for another's use: an instance appears in the ledger only under
  the borrower whose license started it, so a borrower's totals only ever come from its
  own instances' answers (the ``init`` borrower, which runs none, stays at zero).

A restarted enclave is a new instance. A borrower's license admits one instance more than
its slots: a killed instance's link may outlive its process by the custodian's detection
time, and a refused enclave backs off for up to a minute, which would stall the step.

Synchronisation is by log lines (:meth:`~drm_lab.processes.Daemon.wait_for`), process
exits and trio events; the durations of partitions and delays are the faults themselves,
and the consumers pace their retries on an event with a bound. Every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np
import trio

from drm_consumer import Client, ConnectionFailed, RequestFailed
from drm_lab.deployment import Enclave, Lab
from drm_lab.faults import FaultProxy, fault_proxy
from drm_lab.models import tiny_model
from drm_lab.processes import LOOPBACK, Daemon, Deviation, LogEvent
from drm_wire.attestation.policy import Policy

__all__ = ["WEIGHTS", "Campaign", "Report", "Topology", "main", "run_campaign"]

#: How often each fault is drawn (relative weights).
WEIGHTS: Final[dict[str, int]] = {
    "enclave_kill9": 8,
    "enclave_sigterm": 5,
    "custodian_kill9": 3,
    "custodian_sigterm": 2,
    "partition": 14,
    "delay": 10,
    "cut": 12,
    "supply": 16,
    "block": 5,
    "unblock": 5,
    "reclaim": 5,
    "concurrent": 4,
}
#: Restarts are counted as faults of their own kind when a kill or a stop is followed by one.
RESTART_KINDS: Final = ("enclave_restart", "custodian_restart")

#: What each borrower is supplied at start, and the lease the custodian grants in.
INITIAL_SUPPLY: Final = 40
LEASE: Final = 8
#: Consumer tasks per enclave.
WORKERS: Final = 2
#: How long a consumer's request may park for units (``wait``): it paces the consumers.
PARK: Final = 0.5
#: A consumer refused (unreachable, blocked, busy) or cut off waits this long at most
#: for the enclave to change before it tries again.
RETRY: Final = 0.05
#: Bounds one step against real processes (only a bug waits this long).
STEP: Final = 60.0
#: How long the end of a campaign polls the ledger for the last usage reports.
SETTLE: Final = 15.0
#: The enclave declares a silent link dead after 3 heartbeats of 1 s (docs/links.md).
DEAD_LINK: Final = 3.0
#: At most this many enclave processes in one campaign (they share one machine).
MAX_ENCLAVES: Final = 16

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Topology:
    """Borrowers, and enclaves per borrower, that the campaign runs."""

    borrowers: int = 2
    enclaves: int = 3

    def check_supported(self) -> None:
        """Refuse a shape the campaign cannot run on one machine.

        Raises:
            ValueError: no borrower or enclave, or more than :data:`MAX_ENCLAVES` enclave
                processes in all.
        """
        if self.borrowers < 1 or self.enclaves < 1:
            raise ValueError("a topology has at least one borrower and one enclave")
        if self.borrowers * self.enclaves > MAX_ENCLAVES:
            raise ValueError(
                f"{self.borrowers} borrowers x {self.enclaves} enclaves: at most "
                f"{MAX_ENCLAVES} enclave processes on one machine"
            )

    @property
    def names(self) -> list[str]:
        """The borrowers' names, in slot order."""
        return [f"customer{i + 1}" for i in range(self.borrowers)]


@dataclass(eq=False, slots=True)
class InstanceView:
    """What the consumers saw of one enclave instance (one process)."""

    instance_id: str
    borrower: str
    #: Units charged in the answers the consumers got.
    answers: int = 0
    #: Requests whose outcome the consumers never learnt (the connection failed, or the
    #: campaign ended, under them).
    lost: int = 0
    #: Requests sent and not answered yet: an answer may be on its way.
    pending: int = 0
    killed: bool = False
    #: Stopped with SIGTERM but could not settle with the custodian (its units stayed
    #: in doubt, ``enclave_units_in_doubt``): its last reports may be lost, as in a kill.
    unsettled: bool = False
    #: When the harness saw this instance log ``custodian_blocked`` (monotonic), while
    #: the owner has not unblocked since.
    blocked_at: float | None = None


@dataclass(eq=False, slots=True)
class Slot:
    """One enclave position of a borrower: its proxy and its current process."""

    borrower: str
    index: int
    proxy: FaultProxy
    enclave: Enclave | None = None
    changed: trio.Event = field(default_factory=trio.Event)

    def replace(self, enclave: Enclave | None) -> None:
        self.enclave = enclave
        self.changed.set()
        self.changed = trio.Event()

    @property
    def running(self) -> bool:
        return self.enclave is not None and self.enclave.daemon.process.poll() is None


@dataclass(frozen=True, slots=True)
class Draw:
    """One step's parameters, all drawn whether or not the fault uses them (so the
    sequence of draws is the same for a seed whatever state each fault meets)."""

    slot: Slot
    #: A slot of another borrower (of the same one if there is only one).
    other: Slot
    seconds: float
    delay: float
    units: int


@dataclass(slots=True)
class Report:
    """What a campaign did and found."""

    seed: int
    topology: Topology
    faults: Counter[str] = field(default_factory=Counter)
    drawn: int = 0
    steps_checked: int = 0
    answers: int = 0
    lost: int = 0
    instances: int = 0
    #: Units the consumers were charged, per borrower.
    answers_by_borrower: dict[str, int] = field(default_factory=dict)
    #: ``recall`` messages the custodian sent (its ``recall_sent`` log lines).
    recalls: int = 0
    violations: list[str] = field(default_factory=list)
    wall_time: float = 0.0

    @property
    def counted(self) -> int:
        return sum(self.faults.values())

    @property
    def restarts(self) -> int:
        """The counted faults that were restarts after a kill or a stop."""
        return sum(self.faults[kind] for kind in RESTART_KINDS)

    def text(self) -> str:
        lines = [
            f"seed {self.seed}, {self.topology.borrowers} borrower(s) x "
            f"{self.topology.enclaves} enclave(s)",
            f"faults counted: {self.counted} ({self.restarts} of them restarts; drawn "
            f"{self.drawn}), checks: {self.steps_checked}",
            *(f"  {kind:<18} {n}" for kind, n in sorted(self.faults.items())),
            f"answers: {self.answers} units, lost in flight: {self.lost} requests, "
            f"instances: {self.instances}, recalls sent: {self.recalls}",
            *(f"  {b:<18} {n} units" for b, n in sorted(self.answers_by_borrower.items())),
            f"violations: {len(self.violations)}",
            *(f"  {v}" for v in self.violations),
            f"wall time: {self.wall_time:.1f} s",
        ]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "topology": [self.topology.borrowers, self.topology.enclaves],
            "faults": dict(sorted(self.faults.items())),
            "counted": self.counted,
            "restarts": self.restarts,
            "drawn": self.drawn,
            "checks": self.steps_checked,
            "answers": self.answers,
            "lost": self.lost,
            "instances": self.instances,
            "answers_by_borrower": dict(sorted(self.answers_by_borrower.items())),
            "recalls": self.recalls,
            "violations": self.violations,
            "wall_time": round(self.wall_time, 1),
        }


async def _blocking(fn: Callable[..., _T], *args: Any) -> _T:
    return await trio.to_thread.run_sync(partial(fn, *args))


class Campaign:
    """One campaign in ``workdir``: see the module doc. Use :func:`run_campaign`."""

    def __init__(
        self,
        workdir: Path,
        *,
        seed: int,
        faults: int,
        topology: Topology = Topology(),
        env: dict[str, str] | None = None,
        stop_on_violation: bool = False,
        weights: dict[str, int] | None = None,
        supply: int = INITIAL_SUPPLY,
        workers: Sequence[int] | None = None,
    ) -> None:
        """``weights`` replaces :data:`WEIGHTS` (a kind left out is never drawn);
        ``supply`` is what each borrower is supplied at start; ``workers`` is the number
        of consumer tasks per slot, in slot order (by default :data:`WORKERS` each)."""
        topology.check_supported()
        if faults < 1:
            raise ValueError("a campaign injects at least one fault")
        self.weights = dict(WEIGHTS if weights is None else weights)
        if not self.weights or not set(self.weights) <= set(WEIGHTS):
            raise ValueError(f"weights name fault kinds of {sorted(WEIGHTS)}")
        slots = topology.borrowers * topology.enclaves
        self.workers = list(workers) if workers is not None else [WORKERS] * slots
        if len(self.workers) != slots or min(self.workers) < 0:
            raise ValueError(f"workers: one count per slot, {slots} in all")
        self.lab = Lab(workdir, env=env)
        self.rng = random.Random(seed)
        self.target = faults
        self.topology = topology
        self.initial_supply = supply
        self.stop_on_violation = stop_on_violation
        self.report = Report(seed, topology)
        self.slots: list[Slot] = []
        self.licenses: dict[str, Path] = {}
        self.views: dict[str, InstanceView] = {}
        self.blocked: set[str] = set()
        self.reclaimed: set[str] = set()
        #: Units the owner supplied to each borrower (answered 200), and units whose
        #: supply call is still in flight (a concurrent fault checks meanwhile).
        self.supplied: Counter[str] = Counter()
        self._supplying: Counter[str] = Counter()
        self._previous: dict[str, dict[str, Any]] = {}
        self._step = 0
        self._kind = "start"
        self._inputs: dict[str, np.ndarray[Any, Any]] = {}
        self._model = ""
        self._policy: Policy | None = None

    # --- the run -------------------------------------------------------------------

    async def run(self) -> Report:
        started = time.monotonic()
        self.lab.workdir.mkdir(parents=True, exist_ok=True)
        await _blocking(self.lab.prepare)
        tiny = self.lab.write_model("tiny", tiny_model())
        await _blocking(
            partial(
                self.lab.start_custodian, [tiny], initial=0, lease=LEASE,
                options=["--reclaim-margin", "0"],
            )
        )  # fmt: skip
        self._policy = Policy.load(self.lab.policy_path)
        try:
            for borrower in self.topology.names:
                self.licenses[borrower] = await _blocking(
                    partial(
                        self.lab.add_borrower, borrower, max_instances=self.topology.enclaves + 1
                    )
                )
                await self._supply(borrower, self.initial_supply)
            async with AsyncExitStack() as stack:
                for borrower in self.topology.names:
                    for index in range(self.topology.enclaves):
                        proxy = await stack.enter_async_context(
                            fault_proxy(self.lab.custodian_port)
                        )
                        slot = Slot(borrower, index, proxy)
                        self.slots.append(slot)
                        await self._start_enclave(slot)
                async with trio.open_nursery() as nursery:
                    for slot, workers in zip(self.slots, self.workers, strict=True):
                        for _ in range(workers):
                            nursery.start_soon(self._consumer, slot)
                    await self.check()
                    while self.report.counted < self.target:
                        if self.stop_on_violation and self.report.violations:
                            break
                        await self._one_step()
                    nursery.cancel_scope.cancel()
                await self._settle()
        finally:
            with trio.CancelScope(shield=True):  # stop every daemon, even when cancelled
                await _blocking(self.lab.stop_all)
            self.report.wall_time = time.monotonic() - started
            self.report.instances = len(self.views)
            self.report.answers = sum(v.answers for v in self.views.values())
            self.report.lost = sum(v.lost for v in self.views.values())
            self.report.recalls = sum(
                len(d.find_all("recall_sent")) for d in self.lab.daemons if d.name == "custodian"
            )
            for view in self.views.values():
                by = self.report.answers_by_borrower
                by[view.borrower] = by.get(view.borrower, 0) + view.answers
        return self.report

    def _draw(self) -> tuple[str, Draw]:
        kinds = list(self.weights)
        kind = self.rng.choices(kinds, weights=[self.weights[k] for k in kinds])[0]
        slot = self.rng.choice(self.slots)
        partners = [s for s in self.slots if s.borrower != slot.borrower] or self.slots
        other = partners[self.rng.randrange(len(self.slots)) % len(partners)]
        seconds = self.rng.choice(
            [self.rng.uniform(0.05, 1.0), self.rng.uniform(DEAD_LINK + 0.2, DEAD_LINK + 1.5)]
        )
        delay = self.rng.uniform(0.005, 0.2)
        units = self.rng.randint(1, 40)
        return kind, Draw(slot, other, seconds, delay, units)

    async def _one_step(self) -> None:
        kind, draw = self._draw()
        self.report.drawn += 1
        self._step += 1
        self._kind = kind
        with trio.fail_after(STEP * 3):
            changed = await getattr(self, f"_fault_{kind}")(draw)
        if changed:
            self.report.faults[kind] += 1
            await self.check()

    # --- faults: each returns whether it changed a process, a link or the ledger ------

    async def _fault_enclave_kill9(self, draw: Draw) -> bool:
        slot = draw.slot
        enclave = slot.enclave
        if enclave is None or not slot.running:
            return False
        self.views[enclave.instance_id].killed = True
        slot.replace(None)
        await _blocking(enclave.daemon.kill)
        await self._restart_enclave(slot)
        return True

    async def _fault_enclave_sigterm(self, draw: Draw) -> bool:
        slot = draw.slot
        enclave = slot.enclave
        if enclave is None or not slot.running:
            return False
        enclave.daemon.terminate()
        status = await _blocking(enclave.daemon.wait_exit)
        slot.replace(None)
        if enclave.daemon.find("enclave_units_in_doubt") is not None:
            self.views[enclave.instance_id].unsettled = True
        if status != 0:
            self._violation(f"enclave {enclave.instance_id} exited {status} on SIGTERM")
        await self._restart_enclave(slot)
        return True

    async def _restart_enclave(self, slot: Slot) -> None:
        await self.check()  # the step's own fault, before the restart adds another
        await self._start_enclave(slot)
        self.report.faults["enclave_restart"] += 1

    async def _fault_custodian_kill9(self, draw: Draw) -> bool:
        custodian = self.lab.custodian
        assert custodian is not None
        await _blocking(custodian.kill)
        await self._restart_custodian()
        return True

    async def _fault_custodian_sigterm(self, draw: Draw) -> bool:
        custodian = self.lab.custodian
        assert custodian is not None
        custodian.terminate()
        status = await _blocking(custodian.wait_exit)
        if status != 0:
            self._violation(f"custodian exited {status} on SIGTERM")
        await self._restart_custodian()
        return True

    async def _restart_custodian(self) -> None:
        await _blocking(self.lab.restart_custodian)
        self.report.faults["custodian_restart"] += 1

    async def _fault_partition(self, draw: Draw) -> bool:
        proxy = draw.slot.proxy
        if proxy.connections == 0:
            return False
        proxy.partition()
        await trio.sleep(draw.seconds)  # the partition itself
        proxy.heal()
        return True

    async def _fault_delay(self, draw: Draw) -> bool:
        proxy = draw.slot.proxy
        if proxy.connections == 0:
            return False
        proxy.slow(draw.delay)
        await trio.sleep(min(draw.seconds, 2.0))  # the slow path itself
        proxy.heal()
        return True

    async def _fault_cut(self, draw: Draw) -> bool:
        return draw.slot.proxy.cut() > 0

    async def _fault_supply(self, draw: Draw) -> bool:
        await self._supply(draw.slot.borrower, draw.units)
        return True

    async def _supply(self, borrower: str, units: int) -> None:
        assert self.lab.admin is not None
        self._supplying[borrower] += units
        try:
            await _blocking(partial(self.lab.admin.supply, units, borrower=borrower))
        finally:
            self._supplying[borrower] -= units
        self.supplied[borrower] += units

    async def _fault_concurrent(self, draw: Draw) -> bool:
        """Kill -9 one slot's enclave while supplying another slot's borrower."""
        if not draw.slot.running:
            return False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fault_enclave_kill9, draw)
            nursery.start_soon(self._supply, draw.other.borrower, draw.units)
        return True

    async def _fault_block(self, draw: Draw) -> bool:
        borrower = draw.slot.borrower
        if borrower in self.blocked:
            return False
        assert self.lab.admin is not None
        mine = [s.enclave for s in self.slots if s.borrower == borrower and s.enclave is not None]
        marks = {e.instance_id: len(self._block_point(e)[0].events) for e in mine}
        await _blocking(partial(self.lab.admin.block, "fault campaign", borrower=borrower))
        self.blocked.add(borrower)
        for enclave in mine:
            await self._await_block_point(enclave, marks[enclave.instance_id])
        return True

    def _block_point(self, enclave: Enclave) -> tuple[Daemon, str, Callable[[LogEvent], bool]]:
        """Where an instance's block point is logged: the process whose log says so, the
        event, and which of its lines are this instance's. From that line until the owner
        unblocks, nothing may start there. The enclave logs ``custodian_blocked`` as it
        applies the block, before it sends ``block_ack`` (and logs ``block_acknowledged``):
        the window opens at the earlier line, so it checks more than the acknowledgement
        promises (I25), never less."""
        return enclave.daemon, "custodian_blocked", lambda line: True

    async def _await_block_point(self, enclave: Enclave, after: int = 0) -> None:
        """Open the block window of ``enclave``'s instance when its block point is logged."""
        daemon, event, check = self._block_point(enclave)
        await _blocking(partial(daemon.wait_for, event, after=after, timeout=STEP, check=check))
        self.views[enclave.instance_id].blocked_at = time.monotonic()

    async def _fault_unblock(self, draw: Draw) -> bool:
        borrower = draw.slot.borrower
        if borrower not in self.blocked:
            return False
        assert self.lab.admin is not None
        for view in self.views.values():  # the window ends as the owner asks
            if view.borrower == borrower:
                view.blocked_at = None
        self.blocked.discard(borrower)
        await _blocking(partial(self.lab.admin.unblock, borrower=borrower))
        return True

    async def _fault_reclaim(self, draw: Draw) -> bool:
        custodian, admin = self.lab.custodian, self.lab.admin
        assert custodian is not None
        assert admin is not None
        borrower = draw.slot.borrower
        for view in self.views.values():
            if view.borrower != borrower or view.instance_id in self.reclaimed or not view.killed:
                continue
            if custodian.find("instance_reclaimable", instance=view.instance_id) is None:
                continue
            status, doc = await _blocking(
                partial(admin.reclaim, view.instance_id, borrower=borrower)
            )
            if status == 200:
                self.reclaimed.add(view.instance_id)
                return True
            if doc.get("error") not in ("reclaim_too_soon", "nothing_in_doubt"):
                self._violation(f"reclaim of {view.instance_id} answered {status}: {doc}")
        return False

    # --- the enclaves and their consumers ----------------------------------------------

    async def _start_enclave(self, slot: Slot) -> None:
        enclave: Enclave = await _blocking(
            partial(
                self.lab.start_enclave,
                dial=f"{LOOPBACK}:{slot.proxy.port}",
                license_path=self.licenses[slot.borrower],
            )
        )
        self.views[enclave.instance_id] = InstanceView(enclave.instance_id, slot.borrower)
        if slot.borrower in self.blocked:
            await self._await_block_point(enclave)
        slot.replace(enclave)

    async def _consumer(self, slot: Slot) -> None:
        """Hammer ``slot``'s current enclave with the real client for the whole run."""
        assert self._policy is not None
        while True:
            enclave = slot.enclave
            if enclave is None:
                await slot.changed.wait()
                continue
            view = self.views[enclave.instance_id]
            try:
                async with Client.connect(
                    LOOPBACK, enclave.consumer_port, policy=self._policy
                ) as client:
                    if not self._model:
                        (model,) = (await client.info()).models.values()
                        self._model = model.name
                        self._inputs = {
                            spec.name: np.full([d or 1 for d in spec.shape], 0.5, spec.dtype)
                            for spec in model.inputs
                        }
                    while slot.enclave is enclave:
                        await self._one_request(client, view)
            except ConnectionFailed:
                pass
            with trio.move_on_after(RETRY):  # a new process, or try this one again
                await slot.changed.wait()

    async def _one_request(self, client: Client, view: InstanceView) -> None:
        started = time.monotonic()
        view.pending += 1
        try:
            outcome = await client.infer(self._model, self._inputs, wait=PARK)
        except RequestFailed:  # refused: nothing served, nothing charged
            outcome = None
        except BaseException:  # the connection failed, or the run ended, under it
            view.lost += 1
            raise
        finally:
            view.pending -= 1
        if outcome is None:
            await trio.sleep(RETRY)  # pacing a refused consumer, not waiting for anything
            return
        view.answers += outcome.cost
        if view.blocked_at is not None and started > view.blocked_at:
            self._violation(
                f"instance {view.instance_id} served a request started "
                f"{started - view.blocked_at:.3f} s after it acknowledged a block"
            )

    # --- the checker --------------------------------------------------------------------

    def _violation(self, text: str) -> None:
        self.report.violations.append(f"step {self._step} ({self._kind}): {text}")

    async def check(self) -> None:
        """Check the ledger against itself, its past and what the consumers saw."""
        answers = {i: v.answers for i, v in self.views.items()}  # before the ledger read
        lost = {i: v.lost + v.pending for i, v in self.views.items()}
        supplied = Counter(self.supplied)
        ledger = await _blocking(read_ledger, self.lab.state_dir / "ledger.sqlite")
        self.report.steps_checked += 1
        for borrower in sorted({*ledger, *supplied, *(v.borrower for v in self.views.values())}):
            doc = ledger.get(borrower) or read_borrower({}, 0)
            # A supply reaches only the borrower it was made to (I22): between what was
            # confirmed before the read and what was confirmed or in flight after it.
            most = self.supplied[borrower] + self._supplying[borrower]
            if not supplied[borrower] <= doc["supplied"] <= most:
                self._violation(
                    f"{borrower}: the ledger says {doc['supplied']} supplied, the owner "
                    f"supplied {supplied[borrower]} (up to {most} with supplies in flight)"
                )
            self._check_borrower(borrower, doc, answers, lost)

    def _check_borrower(
        self, borrower: str, doc: dict[str, Any], answers: dict[str, int], lost: dict[str, int]
    ) -> None:
        bad = self._violation
        g, s, d = doc["granted"], doc["served"], doc["in_doubt"]
        r, w, sup, rem = doc["returned"], doc["reclaimed"], doc["supplied"], doc["remaining"]
        if min(g, s, d, r, w, sup, rem) < 0:
            bad(f"{borrower}: a negative total {doc}")
        if s + d + r + w != g:
            bad(f"{borrower}: served+in_doubt+returned+reclaimed {s + d + r + w} != granted {g}")
        if not s <= g - r - w <= sup:
            bad(f"{borrower}: not served {s} <= held {g - r - w} <= supplied {sup}")
        if sup + r + w != g + rem:
            bad(f"{borrower}: supplied+returned+reclaimed != granted+remaining ({doc})")
        rows: dict[str, dict[str, Any]] = doc["rows"]
        for instance_id, row in rows.items():
            if row["totals"] != {k: row[k] for k in row["totals"]}:
                bad(
                    f"instance {instance_id}: the ledger's totals {row['totals']} disagree "
                    f"with its records {row}"
                )
            if row["in_doubt"] < 0:
                bad(f"instance {instance_id}: served+returned+reclaimed exceed granted {row}")
        previous = self._previous.get(borrower, {})
        for key in ("supplied", "granted", "served", "returned", "reclaimed"):
            if doc[key] < previous.get(key, 0):
                bad(f"{borrower}: {key} went down from {previous[key]} to {doc[key]}")
        if doc["over_grant"]:
            bad(f"{borrower}: {doc['over_grant']} usage reports served beyond the grant")
        for instance_id, row in rows.items():
            view = self.views.get(instance_id)
            if view is None or view.borrower != borrower:
                bad(f"{borrower} is charged for instance {instance_id}, not one of its own")
                continue
            before = previous.get("rows", {}).get(instance_id, {})
            for key in ("granted", "served", "returned", "reclaimed"):
                if row[key] < before.get(key, 0):
                    bad(f"instance {instance_id}: {key} went down to {row[key]}")
            seen = answers.get(instance_id, 0)
            covered = row["served"] + row["in_doubt"] + row["reclaimed"]
            if seen > covered:
                bad(
                    f"instance {instance_id}: consumers were charged {seen} units, the ledger "
                    f"covers {covered} (served {row['served']}, in doubt {row['in_doubt']})"
                )
            if row["stopped"] and not (view.killed or view.unsettled):
                self._check_exact(instance_id, row, seen, lost.get(instance_id, 0))
        for view in self.views.values():
            if view.borrower == borrower and view.answers and view.instance_id not in rows:
                bad(f"instance {view.instance_id} answered but is not in the ledger")
        self._previous[borrower] = doc

    def _check_exact(self, instance_id: str, row: dict[str, Any], seen: int, lost: int) -> None:
        if not seen <= row["served"] <= seen + lost:
            self._violation(
                f"instance {instance_id}: served {row['served']} in the "
                f"ledger, consumers were charged {seen} with {lost} lost in flight"
            )

    async def _settle(self) -> None:
        """At the end, with the consumers stopped: every instance never killed must have
        reported what it served (bounded poll: the reports are another process's)."""
        self._step, self._kind = self._step + 1, "settle"
        live = [v for v in self.views.values() if not (v.killed or v.unsettled)]
        assert self.lab.admin is not None
        path = self.lab.state_dir / "ledger.sqlite"
        rows: dict[str, dict[str, Any]] = {}
        with trio.move_on_after(SETTLE):
            while True:
                ledger = await _blocking(read_ledger, path)
                rows = {i: r for doc in ledger.values() for i, r in doc["rows"].items()}
                if all(rows.get(v.instance_id, {}).get("served", 0) >= v.answers for v in live):
                    break
                await trio.sleep(0.1)  # another process's state: a bounded poll
        await self.check()
        for view in live:
            row = rows.get(view.instance_id)
            if row is None:
                if view.answers:
                    self._violation(f"instance {view.instance_id} answered, no ledger row")
                continue
            self._check_exact(view.instance_id, row, view.answers, view.lost + view.pending)


def read_ledger(path: Path) -> dict[str, dict[str, Any]]:
    """Every borrower's account from the ledger file, read-only, in one read transaction
    (one snapshot, whatever the custodian writes meanwhile), recomputed from the
    append-only records; each instance row also carries the totals the ledger's triggers
    keep (``totals``), which must agree."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN")
        supplied = dict(conn.execute("SELECT borrower, SUM(units) FROM supplies GROUP BY 1"))
        over = dict(
            conn.execute("SELECT borrower, COUNT(*) FROM usage WHERE over_grant GROUP BY 1")
        )
        per: dict[tuple[str, str], dict[str, int]] = {}

        def add(query: str, *keys: str) -> None:
            for borrower, instance, *values in conn.execute(query):
                row = per.setdefault(
                    (borrower, instance),
                    {"granted": 0, "served": 0, "returned": 0, "reclaimed": 0, "stopped": 0},
                )
                row.update(zip(keys, values, strict=True))

        add("SELECT borrower, instance_id, MAX(cumulative) FROM grants GROUP BY 1, 2", "granted")
        add("SELECT borrower, instance_id, MAX(served_total) FROM usage GROUP BY 1, 2", "served")
        add(
            "SELECT borrower, instance_id, MAX(returned_total), MAX(final) FROM returns "
            "GROUP BY 1, 2",
            "returned", "stopped",
        )  # fmt: skip
        add("SELECT borrower, instance_id, SUM(units) FROM reclaims GROUP BY 1, 2", "reclaimed")
        totals = {
            (b, i): {"granted": g, "served": s, "returned": r, "reclaimed": w, "stopped": t}
            for b, i, g, s, r, w, t in conn.execute(
                "SELECT borrower, instance_id, granted, served, returned, reclaimed, stopped "
                "FROM instance_totals"
            )
        }
        conn.execute("COMMIT")
    finally:
        conn.close()
    ledger: dict[str, dict[str, Any]] = {}
    for borrower in {*supplied, *(b for b, _ in per)}:
        rows = {}
        for (b, instance), counts in per.items():
            if b == borrower:
                in_doubt = counts["granted"] - counts["served"] - counts["returned"]
                rows[instance] = {
                    **counts,
                    "in_doubt": in_doubt - counts["reclaimed"],
                    "totals": totals.get((b, instance), {}),
                }
        ledger[borrower] = read_borrower(rows, supplied.get(borrower, 0), over.get(borrower, 0))
    return ledger


def read_borrower(
    rows: dict[str, dict[str, Any]], supplied: int, over_grant: int = 0
) -> dict[str, Any]:
    """A borrower's totals from its instance rows."""
    doc: dict[str, Any] = {
        key: sum(int(row[key]) for row in rows.values())
        for key in ("granted", "served", "returned", "reclaimed", "in_doubt")
    }
    doc["supplied"] = supplied
    doc["remaining"] = supplied - doc["granted"] + doc["returned"] + doc["reclaimed"]
    doc["over_grant"] = over_grant
    doc["rows"] = rows
    return doc


async def run_campaign(
    workdir: Path,
    *,
    seed: int,
    faults: int,
    topology: Topology = Topology(),
    env: dict[str, str] | None = None,
    stop_on_violation: bool = False,
    weights: dict[str, int] | None = None,
    supply: int = INITIAL_SUPPLY,
    workers: Sequence[int] | None = None,
) -> Report:
    """Run one campaign in ``workdir`` (a fresh directory); its report. The options are
    :class:`Campaign`'s."""
    campaign = Campaign(
        workdir,
        seed=seed,
        faults=faults,
        topology=topology,
        env=env,
        stop_on_violation=stop_on_violation,
        weights=weights,
        supply=supply,
        workers=workers,
    )
    return await campaign.run()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m drm_lab.chaos``: run a campaign, print its report; status 1 on a
    violation, 2 when a process did not do what was expected of it."""
    parser = argparse.ArgumentParser(prog="python -m drm_lab.chaos", description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", type=int, default=500)
    parser.add_argument("--borrowers", type=int, default=Topology().borrowers)
    parser.add_argument(
        "--enclaves", type=int, default=Topology().enclaves, help="enclave processes per borrower"
    )
    parser.add_argument("--workdir", type=Path, required=True, help="a fresh directory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    topology = Topology(args.borrowers, args.enclaves)
    try:
        topology.check_supported()
    except ValueError as exc:
        parser.error(str(exc))
    args.workdir = args.workdir.resolve()  # the daemons run in it: relative paths would nest
    args.workdir.mkdir(parents=True, exist_ok=False)
    try:
        report = trio.run(
            partial(run_campaign, args.workdir, seed=args.seed, faults=args.faults,
                    topology=topology)
        )  # fmt: skip
    except Deviation as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    return 1 if report.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())

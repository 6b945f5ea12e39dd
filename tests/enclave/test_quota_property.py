"""Q11 for the enclave side: random grant/acquire/cancel/commit/release/suspend sequences.

Hypothesis draws a program of operations; one ``trio.run`` (on a manual ``MockClock``)
executes it, letting every task settle (``wait_all_tasks_blocked``) after each step, and
checks after every step that:

Each consumer costs a random ``k`` units (I14: a request of ``k`` items takes ``k`` at
once).

* ``available + in_use + served_total + forfeited == granted_total`` (nothing lost or
  duplicated, whatever was cancelled when);
* ``served_total <= granted_total`` (I2), and it equals the units of the inferences that
  actually committed (I10, I14: ``k`` units are consumed iff an output was produced);
* ``in_use`` is exactly the units of the consumers holding a lease;
* nobody is parked while the oldest parked request's cost is available, and never more
  than ``max_parked``;
* parked requests get their units in the order they parked (no barging by smaller ones);
* nothing is taken while suspended.

Some steps do two things with no checkpoint in between (grant then cancel, cancel then
grant, grant then suspend) to hit the races the module docstring describes.
"""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from drm_enclave.quota import Quota, QuotaError
from drm_wire.errors import ErrorCode

MAX_PARKED = 4

Op = tuple[str, int, int]
_index = st.integers(0, 7)  # which consumer, modulo how many exist
OPS: dict[str, st.SearchStrategy[Op]] = {
    "grant": st.tuples(st.just("grant"), st.integers(1, 4), st.just(0)),
    # wait: -1 is None (park until a grant), 0 is "do not wait", 1 and 3 are seconds.
    # b: the request's cost in units.
    "spawn": st.tuples(st.just("spawn"), st.sampled_from([-1, -1, -1, 0, 1, 3]), st.integers(1, 4)),
    "finish": st.tuples(st.just("finish"), _index, st.integers(0, 1)),  # 0: the model failed
    "cancel": st.tuples(st.just("cancel"), _index, st.just(0)),
    "grant_cancel": st.tuples(st.just("grant_cancel"), st.integers(1, 3), _index),
    "cancel_grant": st.tuples(st.just("cancel_grant"), st.integers(1, 3), _index),
    "jump": st.tuples(st.just("jump"), st.sampled_from([1, 2]), st.just(0)),
    "suspend": st.tuples(st.just("suspend"), st.integers(0, 1), st.integers(0, 2)),  # b: grant
    "resume": st.tuples(st.just("resume"), st.integers(-1, 3), st.just(0)),  # -1: keep count
}


@st.composite
def programs(draw: st.DrawFn) -> list[Op]:
    """Swarm testing: each program uses a random subset of the operations, so that states
    needing many of one kind (many parked consumers, a long suspension) are reached."""
    kinds = draw(st.sets(st.sampled_from(sorted(OPS)), min_size=3))
    # Consumers and grants are what everything else acts on: weight them up.
    weighted = [*sorted(kinds), "spawn", "spawn", "spawn", "grant"]
    op = st.sampled_from(weighted).flatmap(OPS.__getitem__)
    return draw(st.lists(op, min_size=20, max_size=60))


class Harness:
    """Consumers whose fate (commit, fail, cancel) the drawn program decides."""

    def __init__(self, quota: Quota, nursery: trio.Nursery) -> None:
        self.quota = quota
        self.nursery = nursery
        self.scopes: list[trio.CancelScope] = []
        self.finish: list[trio.Event] = []
        self.succeed: list[bool] = []
        self.costs: list[int] = []
        self.holding: set[int] = set()
        self.waiting: list[int] = []  # parked consumers, in the order they parked
        self.tickets: dict[int, int] = {}  # consumer -> its place in the order of parking
        self.served_from_queue = -1  # the latest ticket that got its units after parking
        self.committed = 0
        self.taken_while_suspended = 0

    def spawn(self, wait: float | None, units: int) -> None:
        self.scopes.append(trio.CancelScope())
        self.finish.append(trio.Event())
        self.succeed.append(True)
        self.costs.append(units)
        self.nursery.start_soon(self._consumer, len(self.scopes) - 1, wait)

    async def _consumer(self, me: int, wait: float | None) -> None:
        units = self.costs[me]
        with self.scopes[me]:
            try:
                async with self.quota.take(wait, units=units, on_parked=lambda _: self._park(me)):
                    if me in self.waiting:
                        self.waiting.remove(me)
                        self.served_from_queue = max(self.served_from_queue, self.tickets[me])
                    if self.quota.suspended is not None:
                        self.taken_while_suspended += 1
                    self.holding.add(me)
                    try:
                        await self.finish[me].wait()
                    finally:
                        self.holding.discard(me)
                    if not self.succeed[me]:
                        raise ValueError("inference failed")
                    self.committed += units
            except (QuotaError, ValueError):
                pass
            finally:
                if me in self.waiting:  # left the queue without its units
                    self.waiting.remove(me)

    def _park(self, me: int) -> None:
        self.tickets[me] = len(self.tickets)
        self.waiting.append(me)

    def pick(self, index: int) -> int | None:
        return index % len(self.scopes) if self.scopes else None

    def check(self) -> None:
        q = self.quota
        assert q.available + q.in_use + q.served_total + q.forfeited == q.granted_total
        assert 0 <= q.served_total <= q.granted_total
        assert q.served_total == self.committed
        assert q.in_use == sum(self.costs[i] for i in self.holding)
        assert q.available >= 0
        assert q.parked == 0 or q.available < q.demand
        assert q.parked == len(self.waiting)
        # No barging: nobody who parked later got its units while an older one still waits.
        assert all(self.tickets[w] > self.served_from_queue for w in self.waiting)
        assert q.parked <= MAX_PARKED
        assert self.taken_while_suspended == 0


async def _execute(program: list[Op], clock: trio.testing.MockClock) -> None:
    quota = Quota(max_parked=MAX_PARKED)
    codes = [ErrorCode.CUSTODIAN_UNREACHABLE, ErrorCode.BLOCKED]
    async with trio.open_nursery() as nursery:
        harness = Harness(quota, nursery)
        for name, a, b in program:
            target = harness.pick(b if name in ("grant_cancel", "cancel_grant") else a)
            if name == "spawn":
                target = None
            if name == "grant":
                quota.grant(a)
            elif name == "spawn":
                harness.spawn(None if a < 0 else float(a), b)
            elif name == "finish" and target is not None:
                harness.succeed[target] = bool(b)
                harness.finish[target].set()
            elif name == "cancel" and target is not None:
                harness.scopes[target].cancel()
            elif name == "grant_cancel" and target is not None:
                quota.grant(a)
                harness.scopes[target].cancel()
            elif name == "cancel_grant" and target is not None:
                harness.scopes[target].cancel()
                quota.grant(a)
            elif name == "jump":
                clock.jump(a)
            elif name == "suspend":
                if b:
                    quota.grant(b)  # handed to parked tasks that will not run before...
                quota.suspend(codes[a])  # ...the switch falls
            elif name == "resume":
                quota.resume(available=None if a < 0 else a)
            await wait_all_tasks_blocked()
            harness.check()
        for scope in harness.scopes:  # every consumer goes away; every unit comes back
            scope.cancel()
    harness.check()
    assert quota.in_use == 0
    assert quota.parked == 0


@settings(max_examples=300, deadline=None)
@given(programs())
def test_random_programs_keep_the_books_balanced(program: list[Op]) -> None:
    clock = trio.testing.MockClock()
    trio.run(_execute, program, clock, clock=clock)

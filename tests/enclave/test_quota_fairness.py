"""Fairness between clients on the park queue (R09): round-robin per client, push-out when full.

A client that parks many requests (from many connections: the quota sees only its key) must
not delay a client that parks later by more than one of its requests per turn, and must not
keep it out of a full park queue. Tests run on trio's ``autojump_clock`` and sequence tasks
with ``wait_all_tasks_blocked``, never with a sleep.
"""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from drm_enclave.quota import Quota, QuotaError
from drm_wire.errors import ErrorCode


def assert_balanced(quota: Quota) -> None:
    total = quota.available + quota.in_use + quota.served_total + quota.forfeited
    assert total + quota.returned_total == quota.granted_total
    assert quota.served_total + quota.returned_total <= quota.granted_total
    assert quota.available == 0 or quota.parked == 0 or quota.available < quota.demand


class Clients:
    """Requests that note who got units in which order, and commit at once."""

    def __init__(self, quota: Quota, nursery: trio.Nursery) -> None:
        self.quota = quota
        self.nursery = nursery
        self.served: list[tuple[str, int]] = []
        self.errors: dict[tuple[str, int], ErrorCode] = {}
        self.positions: dict[tuple[str, int], int] = {}
        self.scopes: dict[tuple[str, int], trio.CancelScope] = {}

    async def park_now(self, client: str, name: int, units: int = 1) -> None:
        """Park one request and let it settle, so requests park in the order written."""
        self.park(client, name, units)
        await wait_all_tasks_blocked()

    def park(self, client: str, name: int, units: int = 1) -> None:
        self.scopes[client, name] = trio.CancelScope()
        self.nursery.start_soon(self._run, client, name, units)

    async def _run(self, client: str, name: int, units: int) -> None:
        def parked(position: int) -> None:
            self.positions[client, name] = position

        with self.scopes[client, name]:
            try:
                async with self.quota.take(units=units, client=client, on_parked=parked):
                    self.served.append((client, name))
            except QuotaError as exc:
                self.errors[client, name] = exc.code


async def test_an_honest_client_is_served_after_one_request_of_a_flooding_one() -> None:
    """The flooder parks 200 requests (as if from many connections: one client key); the
    honest client parks later and gets the second unit that arrives, not the 201st."""
    quota = Quota()
    async with trio.open_nursery() as nursery:
        clients = Clients(quota, nursery)
        for name in range(200):  # (in whatever order trio starts them)
            clients.park("addr:10.0.0.66", name)
        await wait_all_tasks_blocked()
        clients.park("addr:10.0.0.7", 0)
        await wait_all_tasks_blocked()
        assert clients.positions["addr:10.0.0.7", 0] == 2  # told the truth about its turn
        assert (quota.parked, quota.parked_clients) == (201, 2)
        units = 0
        while ("addr:10.0.0.7", 0) not in clients.served:
            quota.grant(1)
            units += 1
            await wait_all_tasks_blocked()
            assert_balanced(quota)
        assert units == 2
        assert [client for client, _ in clients.served] == ["addr:10.0.0.66", "addr:10.0.0.7"]
        nursery.cancel_scope.cancel()
    assert quota.parked == 0
    assert_balanced(quota)


async def test_clients_take_turns_and_each_keeps_its_own_order() -> None:
    quota = Quota()
    async with trio.open_nursery() as nursery:
        clients = Clients(quota, nursery)
        for name in range(3):
            await clients.park_now("a", name)
        for name in range(2):
            await clients.park_now("b", name)
        await clients.park_now("c", 0)
        await wait_all_tasks_blocked()
        assert [clients.positions["a", n] for n in range(3)] == [1, 2, 3]
        assert [clients.positions["b", n] for n in range(2)] == [2, 4]
        assert clients.positions["c", 0] == 3
        for _ in range(6):  # one unit at a time: the order woken is the order served
            assert quota.grant(1) == 1
            await wait_all_tasks_blocked()
    assert clients.served == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("a", 2)]
    assert (quota.served_total, quota.available) == (6, 0)
    assert_balanced(quota)


async def test_the_head_waits_for_its_whole_cost_and_nobody_barges() -> None:
    """Round-robin does not let a cheap request of the next client overtake the head."""
    quota = Quota()
    async with trio.open_nursery() as nursery:
        clients = Clients(quota, nursery)
        await clients.park_now("a", 0, units=3)
        await clients.park_now("b", 0, units=1)
        await wait_all_tasks_blocked()
        assert quota.demand == 3
        assert quota.grant(2) == 0
        await wait_all_tasks_blocked()
        assert (clients.served, quota.available, quota.take_back()) == ([], 2, 0)
        assert quota.grant(2) == 2  # one grant wakes all it covers (they run in any order)
        await wait_all_tasks_blocked()
    assert sorted(clients.served) == [("a", 0), ("b", 0)]
    assert_balanced(quota)


async def test_a_cancelled_head_leaves_the_turn_to_its_clients_next_request() -> None:
    """The turn is the client's, not the request's: it was not served, so it keeps it."""
    quota = Quota()
    async with trio.open_nursery() as nursery:
        clients = Clients(quota, nursery)
        await clients.park_now("a", 0, units=4)
        await clients.park_now("a", 1)
        await clients.park_now("b", 0)
        await wait_all_tasks_blocked()
        quota.grant(1)
        await wait_all_tasks_blocked()
        assert clients.served == []
        clients.scopes["a", 0].cancel()  # the head leaves: "a" 1 is covered, then "b"
        await wait_all_tasks_blocked()
        assert clients.served == [("a", 1)]
        quota.grant(1)
        await wait_all_tasks_blocked()
    assert clients.served == [("a", 1), ("b", 0)]
    assert (quota.parked, quota.parked_clients, quota.in_use) == (0, 0, 0)
    assert_balanced(quota)


async def test_a_full_park_queue_pushes_out_the_biggest_clients_newest() -> None:
    quota = Quota(max_parked=4)
    async with trio.open_nursery() as nursery:
        clients = Clients(quota, nursery)
        for name in range(4):
            await clients.park_now("flood", name)
        await wait_all_tasks_blocked()
        await clients.park_now("flood", 4)  # the flooder holds the most: it is refused
        await wait_all_tasks_blocked()
        assert clients.errors == {("flood", 4): ErrorCode.BUSY}
        await clients.park_now("honest", 0)  # pushes out the flooder's newest parked request
        await wait_all_tasks_blocked()
        assert clients.errors[("flood", 3)] is ErrorCode.BUSY
        assert (quota.parked, quota.parked_clients) == (4, 2)
        await clients.park_now("honest", 1)  # 2 against 2 after parking would be 2 vs 3: room made
        await wait_all_tasks_blocked()
        assert clients.errors[("flood", 2)] is ErrorCode.BUSY
        await clients.park_now("honest", 2)  # 3 against 2: it now holds the most, so it is refused
        await wait_all_tasks_blocked()
        assert clients.errors[("honest", 2)] is ErrorCode.BUSY
        assert quota.parked == 4
        for _ in range(4):
            quota.grant(1)
            await wait_all_tasks_blocked()
    assert clients.served == [("flood", 0), ("honest", 0), ("flood", 1), ("honest", 1)]
    assert_balanced(quota)


async def test_a_full_queue_of_one_client_still_refuses_it() -> None:
    quota = Quota(max_parked=2)
    async with trio.open_nursery() as nursery:
        clients = Clients(quota, nursery)
        await clients.park_now("a", 0)
        await clients.park_now("b", 0)
        await wait_all_tasks_blocked()
        await clients.park_now("c", 0)  # everyone holds one: nobody holds more than "c" would
        await wait_all_tasks_blocked()
        assert clients.errors == {("c", 0): ErrorCode.BUSY}
        nursery.cancel_scope.cancel()


async def test_max_parked_zero_refuses_every_park() -> None:
    quota = Quota(max_parked=0)
    async with trio.open_nursery() as nursery:
        clients = Clients(quota, nursery)
        await clients.park_now("a", 0)
        await wait_all_tasks_blocked()
    assert clients.errors == {("a", 0): ErrorCode.BUSY}


async def test_suspension_fails_every_client_and_take_back_waits_for_nobody() -> None:
    quota = Quota()
    async with trio.open_nursery() as nursery:
        clients = Clients(quota, nursery)
        for client in "abc":
            await clients.park_now(client, 0)
        await wait_all_tasks_blocked()
        assert quota.suspend(ErrorCode.BLOCKED) == 3
        await wait_all_tasks_blocked()
    assert set(clients.errors.values()) == {ErrorCode.BLOCKED}
    assert (quota.parked, quota.parked_clients) == (0, 0)


@st.composite
def arrivals(draw: st.DrawFn) -> list[tuple[str, int]]:
    """Steps: ("park", client index) or ("grant", units)."""
    step = st.one_of(
        st.tuples(st.just("park"), st.integers(0, 3)),
        st.tuples(st.just("grant"), st.integers(1, 3)),
    )
    return draw(st.lists(step, min_size=5, max_size=60))


async def _fair(program: list[tuple[str, int]]) -> None:
    quota = Quota()
    async with trio.open_nursery() as nursery:
        clients = Clients(quota, nursery)
        parked_at: dict[tuple[str, int], int] = {}  # request -> len(served) when it parked
        rank: dict[tuple[str, int], int] = {}  # its place in its client's queue then
        counts = [0, 0, 0, 0]
        for kind, value in program:
            if kind == "park":
                client = f"c{value}"
                key = (client, counts[value])
                waiting = [r for r in parked_at if r[0] == client and r not in clients.served]
                rank[key] = len(waiting) + 1
                parked_at[key] = len(clients.served)
                await clients.park_now(client, counts[value])
                counts[value] += 1
            else:
                for _ in range(value):  # one unit at a time: woken order is served order
                    quota.grant(1)
                    await wait_all_tasks_blocked()
            await wait_all_tasks_blocked()
            assert_balanced(quota)
            for request, start in parked_at.items():
                if request in clients.served:
                    continue
                since = clients.served[start:]
                for other in {c for c, _ in since if c != request[0]}:
                    # One request of each other client per turn of the rotation.
                    assert sum(c == other for c, _ in since) <= rank[request]
        for client in {c for c, _ in clients.served}:  # each client's own order is kept
            names = [n for c, n in clients.served if c == client]
            assert names == sorted(names)
        nursery.cancel_scope.cancel()


@settings(max_examples=150, deadline=None)
@given(arrivals())
def test_no_client_waits_more_than_one_request_per_turn_of_any_other(
    program: list[tuple[str, int]],
) -> None:
    trio.run(_fair, program, clock=trio.testing.MockClock(autojump_threshold=0))

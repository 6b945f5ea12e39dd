"""Demand and recall on the enclave link, custodian side (I20, I23, I24): fake enclaves of
one license on a real ``serve()`` over loopback TLS, with the real ledger.

When an instance says requests are parked there (``demand``, version 4) and the
borrower's remaining supply cannot cover them, the custodian recalls what they lack from
instances with no request parked, the one holding most first, credits only what that
instance's ``returned`` confirms, and grants it to the one with demand. Nobody without
demand draws units to itself by recall, and a demand is a claim bounded by the lease.

The fixtures and the fake enclave's helpers are those of ``test_enclave_link``.
"""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from drm_custodian.session import SessionConfig
from drm_wire.errors import ErrorCode, PeerError
from drm_wire.limits import MAX_GRANT_UNITS
from drm_wire.messages import Demand, Grant, Recall, ReturnAck, Returned, Unblock
from drm_wire.net.channel import ChannelError, MessageChannel

from .test_enclave_link import (  # noqa: F401 (fixtures)
    CustodianFactory,
    credentials,
    load_models,
    models,
    platform,
    policy,
    receive,
    receive_until_quiet,
    report,
    start_custodian,
)


def _answer(recall: Recall, returned_total: int, served_total: int = 0) -> Returned:
    return Returned(
        recall_id=recall.recall_id,
        returned_total=returned_total,
        served_total=served_total,
        requests_total=served_total,
        final=False,
    )


class Fake:
    """What a fake enclave keeps to speak version 4: its demand seq and its totals."""

    def __init__(self, channel: MessageChannel, granted: int = 0) -> None:
        self.channel = channel
        self.seq = 0
        self.granted = granted
        self.served = 0
        self.returned = 0
        self.reports = 0

    async def demand(self, units: int, parked: int = 1) -> None:
        self.seq += 1
        await self.channel.send(
            Demand(
                seq=self.seq,
                units=units,
                parked_requests=parked if units else 0,
                granted_total=self.granted,
            )
        )

    async def serve(self, units: int) -> None:
        self.served += units
        self.reports += 1
        await report(self.channel, self.reports, self.served)

    async def give_back(self, recall: Recall, units: int) -> ReturnAck:
        self.returned += units
        await self.channel.send(_answer(recall, self.returned, self.served))
        return await receive(self.channel, ReturnAck)

    async def granted_now(self) -> Grant:
        grant = await receive(self.channel, Grant)
        self.granted = grant.granted_total
        return grant


async def _linked(channel: MessageChannel) -> Fake:
    await load_models(channel, 2)
    return Fake(channel, (await receive(channel, Grant)).granted_total)


async def test_what_a_parked_request_lacks_is_recalled_from_an_idle_instance(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    custodian = await start_custodian(
        initial_inferences=8, session=SessionConfig(lease=4), max_instances=2
    )
    async with custodian.link() as busy_link, custodian.link() as idle_link:
        busy = await _linked(busy_link)
        idle = await _linked(idle_link)
        assert (busy.granted, idle.granted) == (4, 4)
        with capture_logs() as logs:
            await busy.serve(4)  # it served all it held; the supply is all lent
            assert await receive_until_quiet(idle_link, 0.2) == []  # no demand: no recall
            await busy.demand(3, parked=2)  # two requests wait, lacking 3 units
            recall = await receive(idle_link, Recall)
            assert recall.units == 3  # what the demand lacks, not half of what it holds
            # Nothing is credited or granted before the enclave confirms.
            assert (await custodian.balance()).remaining == 0
            assert await receive_until_quiet(busy_link, 0.2) == []
            ack = await idle.give_back(recall, 3)
            assert (ack.recall_id, ack.returned_total) == (recall.recall_id, 3)
            grant = await busy.granted_now()
            assert (grant.units, grant.granted_total) == (3, 7)
            assert await receive_until_quiet(idle_link) == []  # not taken back by the giver
        balance = await custodian.balance()
        assert (balance.supplied, balance.granted, balance.returned, balance.served) == (
            8,
            11,
            3,
            4,
        )
        assert balance.served <= balance.granted - balance.returned <= balance.supplied
        assert [e["units"] for e in logs if e["event"] == "recall_sent"] == [3]


async def test_a_demand_the_supply_covers_is_granted_without_a_recall(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    """Half a lease still held would wait for the half-lease rule; a demand is topped up
    to its lease at once, from the supply, and nobody is recalled."""
    custodian = await start_custodian(
        initial_inferences=20, session=SessionConfig(lease=4), max_instances=2
    )
    async with custodian.link() as busy_link, custodian.link() as idle_link:
        busy = await _linked(busy_link)
        await _linked(idle_link)
        await busy.serve(2)  # holds 2: half a lease, no top-up due
        assert await receive_until_quiet(busy_link, 0.2) == []
        await busy.demand(1)
        grant = await busy.granted_now()
        assert (grant.units, grant.granted_total) == (2, 6)  # back to a full lease
        assert await receive_until_quiet(idle_link) == []


async def test_an_instance_with_parked_requests_is_never_recalled_from(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    custodian = await start_custodian(
        initial_inferences=8, session=SessionConfig(lease=4), max_instances=2
    )
    async with custodian.link() as first_link, custodian.link() as second_link:
        first = await _linked(first_link)
        second = await _linked(second_link)
        await second.demand(2)  # it holds 4 (in use, say) and still lacks 2
        await first.serve(4)
        await first.demand(1)
        assert await receive_until_quiet(second_link) == []  # no recall: it waits too
        assert await receive_until_quiet(first_link, 0.1) == []
        # Its requests served, it says so: now it is idle, and gives to the other.
        await second.serve(1)
        await second.demand(0)
        recall = await receive(second_link, Recall)
        assert recall.units == 1
        await second.give_back(recall, 1)
        assert (await first.granted_now()).units == 1


async def test_a_recall_answered_with_nothing_is_not_asked_again_until_it_reports(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    """The holder's units are all held by running requests: it returns none. The custodian
    does not spin asking it again; its next usage report may have freed some."""
    custodian = await start_custodian(
        initial_inferences=8, session=SessionConfig(lease=4), max_instances=2
    )
    async with custodian.link() as busy_link, custodian.link() as holder_link:
        busy = await _linked(busy_link)
        holder = await _linked(holder_link)
        await busy.serve(4)
        await busy.demand(1)
        recall = await receive(holder_link, Recall)
        assert (await holder.give_back(recall, 0)).returned_total == 0
        await busy.demand(2)  # more parks meanwhile: still nobody to ask
        assert await receive_until_quiet(holder_link) == []
        assert await receive_until_quiet(busy_link, 0.1) == []
        balance = await custodian.balance()
        assert (balance.granted, balance.returned, balance.remaining) == (8, 0, 0)
        await holder.serve(1)  # a request ended: it may hold idle units now
        recall = await receive(holder_link, Recall)
        assert recall.units == 2
        await holder.give_back(recall, 2)
        assert (await busy.granted_now()).units == 2


async def test_a_recall_answer_returning_more_than_it_holds_is_refused(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    """A hostile enclave tries to mint supply: it 'returns' more than it was granted and
    did not serve. Nothing is credited, nothing granted, and its link ends."""
    custodian = await start_custodian(
        initial_inferences=8, session=SessionConfig(lease=4), max_instances=2
    )
    async with custodian.link() as busy_link, custodian.link() as liar_link:
        busy = await _linked(busy_link)
        await _linked(liar_link)
        with capture_logs() as logs:
            await busy.serve(4)
            await busy.demand(4)
            recall = await receive(liar_link, Recall)
            await liar_link.send(_answer(recall, 4, served_total=1))  # 1 + 4 > 4 granted
            with pytest.raises(PeerError) as caught:
                await receive(liar_link, ReturnAck)
            assert caught.value.code is ErrorCode.PROTOCOL_ERROR
            assert await receive_until_quiet(busy_link) == []
        assert any(e["event"] == "enclave_return_refused" for e in logs)
        balance = await custodian.balance()
        assert (balance.granted, balance.returned, balance.remaining) == (8, 0, 0)
        with pytest.raises((ChannelError, PeerError)):
            await receive(liar_link, Grant)


async def test_a_lying_demand_draws_no_more_than_a_lease_and_never_another_borrowers(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    """An enclave claims the largest demand the message allows, again and again. It is
    topped up to its lease and no further; what it draws by recall is what its lease has
    room for; another borrower's supply is untouched; the honest instance keeps what its
    own parked requests need."""
    custodian = await start_custodian(
        initial_inferences=10, session=SessionConfig(lease=4), max_instances=3
    )
    await custodian.admin_call(lambda admin: admin.add_borrower("other"))
    await custodian.admin_call(lambda admin: admin.supply(50, borrower="other"))
    async with (
        custodian.link() as liar_link,
        custodian.link() as honest_link,
        custodian.link() as idle_link,
    ):
        liar = await _linked(liar_link)
        honest = await _linked(honest_link)
        idle = await _linked(idle_link)
        assert (liar.granted, honest.granted, idle.granted) == (4, 4, 2)
        await honest.demand(1)  # it waits too: never a donor
        for _ in range(20):
            await liar.demand(MAX_GRANT_UNITS, parked=MAX_GRANT_UNITS)
        got = await receive_until_quiet(liar_link)
        assert got == []  # it holds its lease: no grant, and nothing recalled for it
        assert await receive_until_quiet(honest_link, 0.1) == []
        assert await receive_until_quiet(idle_link, 0.1) == []
        # It serves its lease; its room is a lease again, and only that is recalled.
        await liar.serve(4)
        await liar.demand(MAX_GRANT_UNITS, parked=MAX_GRANT_UNITS)
        recalls = [m for m in await receive_until_quiet(idle_link) if isinstance(m, Recall)]
        assert [r.units for r in recalls] == [2]  # all the idle one holds, within 4
        assert await receive_until_quiet(honest_link, 0.1) == []
        await idle.give_back(recalls[0], 2)
        grants = [m for m in await receive_until_quiet(liar_link) if isinstance(m, Grant)]
        # The honest instance's demand comes first for the units that came back: the liar
        # (no less in need by its claim) shares what was returned, never beyond its lease.
        liar_got = sum(g.units for g in grants)
        honest_got = sum(
            m.units for m in await receive_until_quiet(honest_link, 0.1) if isinstance(m, Grant)
        )
        assert liar_got + honest_got == 2
        assert liar_got <= 4
    other = await custodian.ledger.balance("other")
    assert (other.supplied, other.granted, other.remaining) == (50, 0, 50)
    mine = await custodian.balance()
    assert mine.served <= mine.granted - mine.returned <= mine.supplied == 10


async def test_demand_that_alternates_moves_units_no_more_than_it_requires(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    """No ping-pong: two instances share 8 units (a lease of 8, all lent). Demand
    alternates between them for ten turns: on its turn an instance parks a request it
    lacks 3 units for, then the request goes away (its consumer gave up) and its units
    stay with it, idle. Each turn moves exactly what that demand lacks, in one recall,
    and between turns, with no demand anywhere, nothing moves at all."""
    custodian = await start_custodian(
        initial_inferences=8, session=SessionConfig(lease=8), max_instances=2
    )
    async with custodian.link() as a_link, custodian.link() as b_link:
        a = await _linked(a_link)
        await load_models(b_link, 2)
        await receive(b_link, Unblock)  # nothing left to grant it
        b = Fake(b_link)
        held = {id(a): 8, id(b): 0}
        recalls: list[int] = []
        for turn in range(10):
            me, other = (b, a) if turn % 2 == 0 else (a, b)
            await me.demand(3)
            recall = await receive(other.channel, Recall)
            recalls.append(recall.units)
            assert recall.units <= held[id(other)]
            held[id(other)] -= recall.units
            await other.give_back(recall, recall.units)
            grant = await me.granted_now()
            held[id(me)] += grant.units
            await me.demand(0)  # the parked request went away; its units stay idle here
            for fake in (a, b):
                assert await receive_until_quiet(fake.channel, 0.1) == [], turn
        assert recalls == [3] * 10
        assert held == {id(a): 8, id(b): 0}
    balance = await custodian.balance()
    assert (balance.granted - balance.returned, balance.returned) == (8, 30)


async def test_a_demand_that_a_grant_crossed_asks_for_nothing_twice(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    """A demand counts as of its granted total: one the enclave sent before a grant
    reached it (or one that replays an old figure) is reduced by what was granted since,
    so no second recall goes out for units already on their way."""
    custodian = await start_custodian(
        initial_inferences=8, session=SessionConfig(lease=4), max_instances=2
    )
    async with custodian.link() as busy_link, custodian.link() as idle_link:
        busy = await _linked(busy_link)
        idle = await _linked(idle_link)
        await busy.serve(4)
        await busy.demand(3)
        await idle.give_back(await receive(idle_link, Recall), 3)
        stale = busy.granted  # the figure it had before the grant below reached it
        assert (await busy.granted_now()).granted_total == 7
        busy.granted = stale
        await busy.demand(3)  # crossed the grant: it lacks nothing the grant did not bring
        assert await receive_until_quiet(idle_link) == []
        assert await receive_until_quiet(busy_link, 0.1) == []
        # The same figure as of the new total is a real new need: now it is asked for.
        busy.granted = 7
        await busy.demand(1)
        recall = await receive(idle_link, Recall)
        assert recall.units == 1


async def test_a_need_its_full_lease_left_no_room_for_is_recalled_once_it_reports(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    """Its whole lease is held by requests running (not reported yet) when another
    parks: no room, so nothing is recalled for it. Its report frees the room: then the
    custodian recalls what the parked request lacks."""
    custodian = await start_custodian(
        initial_inferences=8, session=SessionConfig(lease=4), max_instances=2
    )
    async with custodian.link() as busy_link, custodian.link() as idle_link:
        busy = await _linked(busy_link)
        idle = await _linked(idle_link)
        await busy.demand(4)  # 4 units in use, 4 more wanted: over its lease
        assert await receive_until_quiet(idle_link) == []
        await busy.serve(3)  # three ended, one still runs: room for 3 of the 4
        recall = await receive(idle_link, Recall)
        assert recall.units == 3
        await idle.give_back(recall, 3)
        assert (await busy.granted_now()).units == 3

"""Several enclave instances per license sharing one borrower's supply (I23).

The registry admits up to a license's ``max_instances`` live instances; the ledger plans
every grant against the borrower's remaining supply in one transaction, so any number of
instances, in any order of grants, reports, deaths and returns, never together hold more
than was supplied. The interleavings here are drawn from seeded generators: the same
seeds give the same runs, and each step is checked against the invariant.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from drm_custodian.ledger import Balance, GrantPlan, Ledger
from drm_custodian.registry import DuplicateInstance, InstanceLimit, Registry, SessionHooks
from drm_custodian.session import _plan

from .session_fakes import FakeSession


@dataclass(eq=False)
class Claimant(FakeSession):
    """A session whose grant plan never grants: the registry's own contract alone."""

    plan_units: int = 0


def _iid(n: int) -> str:
    return f"{n:032x}"


async def test_a_license_admits_up_to_its_cap_and_refuses_the_next_naming_it() -> None:
    registry = Registry()
    live = [Claimant("acme", "lic_a", _iid(n)) for n in range(3)]
    for session in live:
        await registry.claim(session, max_instances=3)
    assert registry.license_instances("lic_a") == registry.count("acme") == 3
    with pytest.raises(InstanceLimit) as refused:
        await registry.claim(Claimant("acme", "lic_a", _iid(9)), max_instances=3)
    assert isinstance(refused.value, DuplicateInstance)  # the wire code stays the same
    assert str(refused.value) == "this license admits 3 live enclave instances and 3 are linked"
    assert not any(session.closed for session in live)  # the live ones serve on
    assert registry.live_instances("acme") == {_iid(n) for n in range(3)}

    registry.release(live[1])  # one ends: its place is free again
    await registry.claim(Claimant("acme", "lic_a", _iid(9)), max_instances=3)
    assert registry.license_instances("lic_a") == 3

    await registry.claim(Claimant("acme", "lic_b", _iid(20)))  # the default cap: one
    with pytest.raises(InstanceLimit, match="admits 1 live enclave instance and 1 is"):
        await registry.claim(Claimant("acme", "lic_b", _iid(21)))
    with pytest.raises(ValueError, match="max_instances"):
        await registry.claim(Claimant("acme", "lic_c", _iid(30)), max_instances=0)


async def test_a_reconnection_at_the_cap_supersedes_and_never_overfills(
    nursery: trio.Nursery,
) -> None:
    """Cap 2. Instance 1 redials while its old link still counts; instances 3 and 4 race
    it for the places. At no instant are more than 2 live, and the redial gets back in."""
    registry = Registry()
    old = Claimant("acme", "lic_a", _iid(1))
    await registry.claim(old, max_instances=2)
    new = Claimant("acme", "lic_a", _iid(1))
    redialled = trio.Event()

    async def redial() -> None:
        await registry.claim(new, max_instances=2)
        redialled.set()

    nursery.start_soon(redial)
    await trio.testing.wait_all_tasks_blocked()
    assert old.closed
    assert not redialled.is_set()  # waits for the old link to end
    third = Claimant("acme", "lic_a", _iid(3))
    await registry.claim(third, max_instances=2)  # the old link holds the other place
    with pytest.raises(InstanceLimit):
        await registry.claim(Claimant("acme", "lic_a", _iid(4)), max_instances=2)
    assert registry.license_instances("lic_a") == 2
    registry.release(old)
    old.finished.set()
    await trio.testing.wait_all_tasks_blocked()
    assert redialled.is_set()
    assert registry.live_instances("acme") == {_iid(1), _iid(3)}
    assert registry.license_instances("lic_a") == 2


@dataclass(eq=False)
class Planned(Claimant):
    """A ready session with the daemon's own grant rule (lease 8)."""

    @property
    def grant_plan(self) -> GrantPlan:
        return functools.partial(_plan, lease=8, reserve=1, need=self.need)


async def test_a_short_supply_goes_first_to_the_instance_holding_least(ledger: Ledger) -> None:
    """Three instances are due a top-up; the supply covers one. The exhausted one (it may
    have requests parked) gets it, not the first linked, which still holds 3."""
    registry = Registry()
    a, b, c = (Planned("acme", "lic_a", _iid(n)) for n in (1, 2, 3))
    await ledger.supply("acme", 24)
    for session, served in ((a, 5), (b, 8), (c, 7)):
        await registry.claim(session, max_instances=3)
        await ledger.record_grant("acme", session.instance_id, 8)
        await ledger.record_usage("acme", session.instance_id, served, 1)
        session.outstanding = 8 - served
    hooks = SessionHooks(registry)
    assert [i for i, _ in hooks.grant_plans("acme")] == [
        b.instance_id,
        c.instance_id,
        a.instance_id,
    ]
    result = await ledger.supply("acme", 8, grant_to=hooks.grant_plans("acme"))
    assert [(g.instance_id, g.units) for g in result.grants] == [(b.instance_id, 8)]
    assert result.balance.remaining == 0


async def test_a_supply_goes_first_to_the_instance_whose_requests_wait(ledger: Ledger) -> None:
    """I24: of two instances, the one that says requests wait there (its need) is planned
    first and topped up to its lease, even though the other holds less; the other gets
    only what the need leaves."""
    registry = Registry()
    waiting = Planned("acme", "lic_a", _iid(1), outstanding=3, need=2)
    empty = Planned("acme", "lic_a", _iid(2), outstanding=0)
    await ledger.supply("acme", 16)
    for session, served in ((waiting, 5), (empty, 8)):
        await registry.claim(session, max_instances=2)
        await ledger.record_grant("acme", session.instance_id, 8)
        await ledger.record_usage("acme", session.instance_id, served, 1)
    hooks = SessionHooks(registry)
    assert [i for i, _ in hooks.grant_plans("acme")] == [waiting.instance_id, empty.instance_id]
    result = await ledger.supply("acme", 6, grant_to=hooks.grant_plans("acme"))
    assert [(g.instance_id, g.units) for g in result.grants] == [
        (waiting.instance_id, 5),  # back to its lease of 8, though it held 3
        (empty.instance_id, 1),
    ]


# --- the shared supply, under hostile orders ---------------------------------------------


@dataclass
class Enclave:
    """One instance as the custodian can know it: what it was sent, what it served."""

    instance_id: str
    received: int = 0  # granted total it holds (grants reach it after the commit)
    served: int = 0
    returned: int = 0
    alive: bool = True
    stale_report: int | None = None  # a report written earlier, delivered later
    seq: int = 0
    in_flight: list[int] = field(default_factory=list)  # committed grants not yet received


def _check(balance: Balance, enclaves: list[Enclave], lease: int) -> None:
    """I23 (with I1, I2): served <= granted and not returned <= supplied, per borrower;
    per instance, what it holds never exceeds its lease."""
    held = balance.granted - balance.returned - balance.reclaimed
    assert balance.served <= held <= balance.supplied, balance
    assert balance.remaining == balance.supplied - held >= 0, balance
    for enclave in enclaves:
        assert enclave.served + enclave.returned <= enclave.received
        assert enclave.received - enclave.served - enclave.returned <= lease


@pytest.mark.parametrize("seed", range(6))
async def test_grants_to_several_instances_never_exceed_the_supply(
    ledger: Ledger, seed: int
) -> None:
    """Supplies, grants, usage reports racing grants (stale and replayed ones), enclaves
    serving up to what they hold, returns, instances dying mid-lease and written off, and
    the borrower's last units raced for by every instance at once."""
    rng = random.Random(seed)
    lease = rng.choice([3, 5, 8])
    plan = functools.partial(_plan, lease=lease, reserve=rng.randint(1, lease))
    enclaves = [Enclave(_iid(seed * 100 + n)) for n in range(3)]
    supplied = 0
    for _ in range(250):
        live = [e for e in enclaves if e.alive]
        enclave = rng.choice(live) if live else None
        step = rng.randrange(9)
        if step == 0 or enclave is None:  # a supply, with the grants it makes due
            units = rng.randint(1, 2 * lease)
            supplied += units
            supply = await ledger.supply(
                "acme", units, grant_to=[(e.instance_id, plan) for e in live]
            )
            for grant in supply.grants:
                next(e for e in enclaves if e.instance_id == grant.instance_id).in_flight.append(
                    grant.cumulative
                )
        elif step == 1:  # a pump's own sync
            _, due = await ledger.grant_due("acme", enclave.instance_id, plan)
            if due is not None:
                enclave.in_flight.append(due.cumulative)
        elif step == 2 and enclave.in_flight:  # a grant arrives (maybe out of order)
            total = enclave.in_flight.pop(rng.randrange(len(enclave.in_flight)))
            enclave.received = max(enclave.received, total)
        elif step == 3:  # it serves what it holds
            free = enclave.received - enclave.served - enclave.returned
            enclave.served += rng.randint(0, max(free, 0))
        elif step == 4:  # a report, written now, maybe delivered later
            enclave.seq += 1
            if enclave.stale_report is None and rng.random() < 0.5:
                enclave.stale_report = enclave.served
            else:
                await ledger.record_usage("acme", enclave.instance_id, enclave.served, enclave.seq)
        elif step == 5 and enclave.stale_report is not None:  # the stale one, late
            await ledger.record_usage(
                "acme", enclave.instance_id, enclave.stale_report, rng.randint(1, enclave.seq)
            )
            enclave.stale_report = None
        elif step == 6 and enclave.received > 0:  # it gives back some idle units
            free = enclave.received - enclave.served - enclave.returned
            back = rng.randint(0, max(free, 0))
            returned = await ledger.record_return(
                "acme",
                enclave.instance_id,
                returned_total=enclave.returned + back,
                served_total=enclave.served,
                requests_total=0,
                final=False,
                recall_id=enclave.seq,
            )
            assert returned.refused is None, returned
            enclave.returned += back
        elif step == 7 and rng.random() < 0.1:  # it dies mid-lease: its units stay in doubt
            enclave.alive = False
            before = await ledger.balance("acme")
            if rng.random() < 0.5 and await ledger.instance("acme", enclave.instance_id):
                written_off = await ledger.reclaim("acme", enclave.instance_id)
                assert written_off.balance.remaining == before.remaining + written_off.units
            enclaves.append(Enclave(_iid(seed * 100 + len(enclaves))))  # its replacement
        elif step == 8:  # every live instance races for the borrower's last units at once
            async with trio.open_nursery() as nursery:
                for racer in live:

                    async def sync(racer: Enclave = racer) -> None:
                        _, won = await ledger.grant_due("acme", racer.instance_id, plan)
                        if won is not None:
                            racer.in_flight.append(won.cumulative)

                    nursery.start_soon(sync)
        balance = await ledger.balance("acme")
        assert balance.supplied == supplied
        _check(balance, enclaves, lease)
    records = await ledger.instances("acme")
    assert sum(r.granted for r in records) == (await ledger.balance("acme")).granted
    assert len(records) >= 2  # the supply really was shared

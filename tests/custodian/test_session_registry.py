"""The registry of live sessions: one instance per license, supersede, hooks."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from drm_custodian.ledger import Ledger
from drm_custodian.registry import (
    DEFAULT_BLOCK_REASON,
    GRANT_SEND_WAIT,
    DuplicateInstance,
    Registry,
    SessionHooks,
)
from drm_custodian.session import EnclaveSession, SessionConfig

from .session_fakes import FakeSession


async def test_a_supply_grants_ready_sessions_and_wakes_the_rest(ledger: Ledger) -> None:
    registry = Registry()
    ready = FakeSession("acme", "lic_a", "1" * 32)
    loading = FakeSession("acme", "lic_b", "2" * 32, ready=False)
    theirs = FakeSession("other", "lic_c", "3" * 32)
    for session in (ready, loading, theirs):
        await registry.claim(session)
    hooks = SessionHooks(registry)
    plans = hooks.grant_plans("acme")
    assert [instance for instance, _ in plans] == [ready.instance_id]  # the ready one only

    result = await ledger.supply("acme", 5, grant_to=plans)
    await hooks.on_supplied("acme", result)
    assert [(g.instance_id, g.units, left) for g, left in ready.committed] == [
        (ready.instance_id, 1, 4)
    ]
    assert ready.waited_for == [1]  # the answer waits until that grant is on the wire
    assert (ready.woken, loading.woken, theirs.woken) == (0, 1, 0)
    assert loading.committed == theirs.committed == []


async def test_a_supply_answer_waits_for_a_stuck_link_no_longer_than_the_limit(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    class Stuck(FakeSession):
        async def wait_sent(self, granted_total: int) -> None:
            await trio.sleep_forever()  # its pump never gets the grant out

    registry = Registry()
    stuck = Stuck("acme", "lic_a", "1" * 32)
    await registry.claim(stuck)
    hooks = SessionHooks(registry)
    result = await ledger.supply("acme", 5, grant_to=hooks.grant_plans("acme"))
    start = trio.current_time()
    await hooks.on_supplied("acme", result)
    assert trio.current_time() - start == GRANT_SEND_WAIT
    assert len(stuck.committed) == 1  # handed over all the same: it stays charged (P2)


async def test_one_instance_per_license() -> None:
    registry = Registry()
    first = FakeSession("acme", "lic_a", "1" * 32)
    await registry.claim(first)
    with pytest.raises(DuplicateInstance):
        await registry.claim(FakeSession("acme", "lic_a", "2" * 32))
    assert not first.closed
    await registry.claim(FakeSession("acme", "lic_b", "2" * 32))  # another license is fine
    assert registry.count("acme") == 2


async def test_the_same_instance_supersedes_its_old_session(nursery: trio.Nursery) -> None:
    registry = Registry()
    old = FakeSession("acme", "lic_a", "1" * 32)
    new = FakeSession("acme", "lic_a", "1" * 32)
    await registry.claim(old)
    claimed = trio.Event()

    async def claim_new() -> None:
        await registry.claim(new)
        claimed.set()

    nursery.start_soon(claim_new)
    await trio.testing.wait_all_tasks_blocked()
    assert old.closed
    assert not claimed.is_set()  # waits for the old one to end
    registry.release(old)
    old.finished.set()
    with trio.fail_after(1):
        await claimed.wait()
    assert list(registry.sessions("acme")) == [new]
    registry.release(old)  # a late release of the old one changes nothing
    assert registry.count("acme") == 1


async def test_hooks_wake_the_borrowers_sessions_only() -> None:
    registry = Registry()
    mine, theirs = FakeSession("acme", "lic_a", "1" * 32), FakeSession("other", "lic_b", "2" * 32)
    await registry.claim(mine)
    await registry.claim(theirs)
    hooks = SessionHooks(registry)
    await hooks.on_blocked("acme", "audit")
    await hooks.on_unblocked("acme")
    assert (mine.woken, theirs.woken) == (2, 0)
    assert registry.block_reason("acme") == "audit"
    assert registry.block_reason("other") == DEFAULT_BLOCK_REASON
    assert hooks.instances("acme") == 1
    registry.close_all()
    assert mine.closed
    assert theirs.closed


async def test_an_ended_session_releases_a_supply_answer_that_waits_on_it(
    nursery: trio.Nursery,
) -> None:
    """A link that ends before its grant went out must not hold the admin answer until
    ``GRANT_SEND_WAIT``: ``finish`` (the session's end) releases ``wait_sent`` at once.
    Only the session's own state is involved, so its collaborators are left out."""
    unused: Any = None
    context: Any = SimpleNamespace(config=SessionConfig(), ledger=unused, models=())
    session = EnclaveSession(context, unused, unused, unused, "1" * 32)
    released = trio.Event()

    async def answer() -> None:
        await session.wait_sent(5)
        released.set()

    nursery.start_soon(answer)
    await trio.testing.wait_all_tasks_blocked()
    assert not released.is_set()  # nothing sent, the session lives: it waits
    session.finish()
    with trio.fail_after(1):
        await released.wait()
    await session.wait_sent(10)  # and an ended session never makes anyone wait again


async def test_end_times_are_kept_for_the_reclaim_window_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A custodian up for months keeps end times of the last window's instances only, and
    forgetting one never makes an instance look silent for less than it was (I21)."""
    window = 60.0
    registry = Registry(forget_after=window)
    start = trio.current_time()
    for n in range(1000):  # an enclave restarting every 10 s for almost three hours
        session = FakeSession("acme", "lic_a", f"{n:032x}")
        await registry.claim(session)
        await trio.sleep(10)
        registry.release(session)
    assert registry.remembered == 7  # the last 60 s: ended at now, now-10, ... now-60
    latest, oldest_kept = f"{999:032x}", f"{993:032x}"
    assert registry.silent_for("acme", latest) == 0
    assert registry.silent_for("acme", oldest_kept) == window  # not yet reclaimable...
    forgotten = f"{0:032x}"  # ...and a forgotten one reads as silent since the start
    assert registry.silent_for("acme", forgotten) == trio.current_time() - start > window
    # An instance that links again and ends moves to the back: not dropped early.
    again = FakeSession("acme", "lic_a", oldest_kept)
    await registry.claim(again)
    registry.release(again)
    assert registry.silent_for("acme", oldest_kept) == 0
    await trio.sleep(window + 1)
    registry.release(FakeSession("acme", "lic_b", "f" * 32))  # pruning runs on an end
    assert registry.remembered == 1
    silence = registry.silent_for("acme", oldest_kept)
    assert silence is not None
    assert silence > window


def test_forget_after_must_be_a_non_negative_number() -> None:
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="forget_after"):
            Registry(started_at=0.0, forget_after=bad)

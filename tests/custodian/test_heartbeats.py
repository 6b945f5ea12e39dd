"""The links' one heartbeat timer: each phase wakes once an interval, phases spread out."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from drm_custodian.heartbeats import HeartbeatClock


async def test_each_phase_ticks_once_an_interval_spread_over_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = HeartbeatClock(1.0, phases=4)
    phases = [clock.take_phase() for _ in range(5)]
    assert phases == [0, 1, 2, 3, 0]  # round robin, as links start
    started = trio.current_time()
    woken: dict[int, list[float]] = {phase: [] for phase in range(4)}

    async def link(phase: int) -> None:
        for _ in range(3):
            await clock.wait(phase)
            woken[phase].append(trio.current_time() - started)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock.run)
        async with trio.open_nursery() as links:
            for phase in range(4):
                links.start_soon(link, phase)
        nursery.cancel_scope.cancel()
    for phase, times in woken.items():
        first = (phase or 4) / 4
        assert times == pytest.approx([first, first + 1, first + 2]), phase


async def test_a_link_that_waits_after_its_tick_gets_the_next_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = HeartbeatClock(2.0, phases=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clock.run)
        await trio.sleep(1.5)  # phase 1 ticked at 1.0: missed
        await clock.wait(1)
        assert trio.current_time() == pytest.approx(3.0)  # one interval after the missed one
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("interval", "phases"), [(0.0, 10), (-1.0, 10), (1.0, 0)])
def test_a_clock_needs_a_positive_interval_and_a_phase(interval: float, phases: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        HeartbeatClock(interval, phases)

"""One timer for the heartbeats of every enclave link.

Why: each session used to sleep one interval between its heartbeats. With a thousand
links that is a thousand timers expiring every second, each a cancel scope's deadline
delivered into its task as a ``Cancelled`` exception, and at idle that cost the
custodian more than sending the heartbeats did.

How: :class:`HeartbeatClock` ticks :data:`PHASES` times an interval; each session takes
a phase (round robin, as sessions start) and waits on that phase's event, so one timer
expiry wakes one phase's links and the heartbeats stay spread over the interval instead
of leaving in one burst (a grant that falls due meanwhile waits behind one phase at
most). A session sends its first heartbeat at once and then one per tick of its phase:
never more than an interval (plus the time a send takes) apart, as before
(docs/links.md, heartbeats).
"""

from __future__ import annotations

import itertools
from typing import Final

import trio

__all__ = ["PHASES", "HeartbeatClock"]

#: Ticks per interval; a link's heartbeats follow one of them.
PHASES: Final = 10


class HeartbeatClock:
    """Wakes the links of each phase once per ``interval``; :meth:`run` must be running."""

    def __init__(self, interval: float, phases: int = PHASES) -> None:
        if not interval > 0 or phases < 1:
            raise ValueError("the interval must be positive and there must be a phase")
        self.interval = interval
        self._ticks = [trio.Event() for _ in range(phases)]
        self._phases = itertools.cycle(range(phases))

    def take_phase(self) -> int:
        """A phase for a new link (round robin)."""
        return next(self._phases)

    async def wait(self, phase: int) -> None:
        """Until the next tick of ``phase``."""
        await self._ticks[phase].wait()

    async def run(self) -> None:
        """Tick until cancelled (a late tick is made up at once: none is skipped)."""
        phases = len(self._ticks)
        step = self.interval / phases
        started = trio.current_time()
        for tick in itertools.count(1):
            await trio.sleep_until(started + tick * step)
            phase = tick % phases
            due, self._ticks[phase] = self._ticks[phase], trio.Event()
            due.set()

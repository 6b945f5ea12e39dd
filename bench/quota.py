"""Quota benchmark: in-process wake-up latency, grant -> parked request running.

Run with ``python bench/quota.py`` (a few seconds). One waiter task loops: take a unit
(parking, since none is available), note the time, commit. The releaser waits until the
waiter is parked (``wait_all_tasks_blocked``, outside the timed span), reads the clock and
calls ``quota.grant(1)``. The latency is grant -> the waiter running again with its lease.

Baselines, measured the same way in the same run: ``trio.Event.set`` -> waiter, and
``trio.Semaphore.release`` -> ``acquire``. Each run does ``WAKEUPS`` wake-ups; figures are
the median over ``RUNS`` runs of each run's p50 / p99, with [min-max]. The in-process
budget is ``BUDGET_US`` (p50): small next to a grant's trip across the custodian link.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import trio
from trio.testing import wait_all_tasks_blocked

from drm_enclave.quota import Quota

RUNS = 5
WAKEUPS = 20_000
BUDGET_US = 20.0

Park = Callable[[], Awaitable[None]]
Wake = Callable[[], object]


def quota_pair() -> tuple[Park, Wake]:
    quota = Quota()

    async def park() -> None:
        lease = await quota.acquire(wait=None)
        lease.commit()

    return park, lambda: quota.grant(1)


def event_pair() -> tuple[Park, Wake]:
    holder = [trio.Event()]

    async def park() -> None:
        await holder[0].wait()
        holder[0] = trio.Event()

    return park, lambda: holder[0].set()


def semaphore_pair() -> tuple[Park, Wake]:
    semaphore = trio.Semaphore(0)
    return semaphore.acquire, semaphore.release


async def measure(make: Callable[[], tuple[Park, Wake]]) -> list[float]:
    park, wake = make()
    samples: list[float] = []
    started = 0.0

    async def waiter() -> None:
        for _ in range(WAKEUPS):
            await park()
            samples.append(time.perf_counter() - started)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        for _ in range(WAKEUPS):
            await wait_all_tasks_blocked()  # the waiter is parked
            started = time.perf_counter()
            wake()
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    primitives = {
        "Quota.grant -> parked acquire": quota_pair,
        "trio.Event.set -> waiter (baseline)": event_pair,
        "trio.Semaphore.release -> acquire": semaphore_pair,
    }
    p50s: dict[str, list[float]] = {name: [] for name in primitives}
    p99s: dict[str, list[float]] = {name: [] for name in primitives}
    for _ in range(RUNS):
        for name, make in primitives.items():
            samples = trio.run(measure, make)
            p50s[name].append(pct(samples, 0.5) * 1e6)
            p99s[name].append(pct(samples, 0.99) * 1e6)

    version = sys.version.split()[0]
    print(
        f"quota wake-up bench: {RUNS} runs x {WAKEUPS:,} wake-ups, python {version}, trio ", end=""
    )
    print(f"{trio.__version__}\n")
    baseline = statistics.median(p50s["trio.Event.set -> waiter (baseline)"])
    baseline99 = statistics.median(p99s["trio.Event.set -> waiter (baseline)"])
    print("| primitive | p50 median [min-max] | p99 median | p50 / Event | p99 / Event |")
    print("| --- | --- | --- | --- | --- |")
    for name in primitives:
        p50, p99 = statistics.median(p50s[name]), statistics.median(p99s[name])
        print(
            f"| {name} | {p50:.1f} µs [{min(p50s[name]):.1f}-{max(p50s[name]):.1f}] "
            f"| {p99:.1f} µs | {p50 / baseline:.2f}x | {p99 / baseline99:.2f}x |"
        )
    quota_p50 = statistics.median(p50s["Quota.grant -> parked acquire"])
    verdict = "met" if quota_p50 <= BUDGET_US else "NOT met"
    print(f"\nin-process budget p50 <= {BUDGET_US:.0f} µs: {verdict} ({quota_p50:.1f} µs)")


if __name__ == "__main__":
    main()

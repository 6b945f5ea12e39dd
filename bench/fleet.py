"""Scale benchmark: one custodian, 1,000 enclave links across 50 borrowers, on loopback.

Run with ``python bench/fleet.py`` from the repository root (about 3 minutes on 2 cores,
most of it ``borrower add`` and the idle window; ``--quick`` for a smoke run of 4
borrowers x 5 links). The custodian is the real daemon, started as ``tests/e2e`` start
it (:class:`drm_lab.deployment.Lab`: ``init``, ``measure``, ``serve`` with the tiny
model), its borrowers made with ``drm_custodian borrower add NAME --max-instances 20``.
The enclaves are light ones in this process (:class:`drm_lab.fleet.LightEnclave`: real
RA-TLS client sockets with simulated quotes, one key pair each, the real protocol
through ``drm_wire``, no onnxruntime), all on one trio loop; the CPU this generator
costs is printed too.

Printed, each beside what it is compared with (a baseline measured in the same run, or
the target of the scale issue) as a ratio:

* admission: first dial -> last enclave's first grant (64 dials in flight at once), and
  links/s; vs opening as many bare TLS connections (same dial concurrency) into the
  floor's echo server;
* supply -> grant: ``POST /borrowers/NAME/supply_inferences`` -> each enclave of that
  borrower receives its grant, with every link live (the borrower's enclaves first spend
  just over half a lease, so the supply tops all 20 up); p50/p99 per enclave and of the
  last of the 20; vs the 20 ms target; and the custodian's share: POST -> it starts
  sending the round's last grant (``send_started`` in its ``grant_pushed`` log lines);
* recall -> parked request served: an enclave spends its last unit and reports it, then
  a request parks and it sends ``demand`` for one unit; the custodian recalls from a peer
  of the same borrower and grants; demand -> grant received, p50/p99;
* block -> acknowledged: ``POST /borrowers/NAME/block`` with ``wait`` answers once every
  live enclave of the borrower has sent ``block_ack`` (the custodian's own count, I25),
  then an unblock; once per borrower, p50/p99; vs supply -> all grants p50;
* heartbeat CPU at idle: the custodian's CPU (``/proc/PID/stat``) over ``--idle`` seconds
  with every link idle, as % of one core; vs the floor: the same number of messages a
  second, of a heartbeat frame's size, over as many plain TLS loopback connections into
  a minimal trio TLS echo server process (no protocol); and vs the 10% target;
* custodian RSS per link: (RSS with every link - RSS with none, after one link came and
  went) / links; vs the 256 KiB target.

The soft ``RLIMIT_NOFILE`` is raised to the hard limit first (the custodian inherits it).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import structlog
import trio

from drm_daemon.collector import settle_heap
from drm_lab.fleet import (
    FleetPlan,
    FleetResult,
    Floor,
    echo_floor,
    heartbeat_frame_size,
    percentile,
    run_fleet,
)
from drm_wire.limits import HEARTBEAT_INTERVAL

#: The scale issue's targets.
SUPPLY_GRANT_P99_S = 0.020
IDLE_CPU_SHARE = 0.10
IDLE_FLOOR_RATIO = 1.2
RSS_PER_LINK = 256 * 1024


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _row(figure: str, measured: str, versus: str, ratio: float, verdict: str = "") -> str:
    return f"| {figure} | {measured} | {versus} | {ratio:.2f}x | {verdict} |"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(result: FleetResult, floor: Floor) -> list[str]:
    """The table: each figure, what it is compared with, the ratio, the target's verdict."""
    plan = result.plan
    links = plan.links
    rows = [
        "| figure | measured | compared with | ratio | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    admit = result.admit_from_dial
    rows.append(
        _row(
            f"admit {links} links (first dial -> last grant)",
            f"{admit:.2f} s, {links / admit:.0f} links/s",
            f"{links} bare TLS connects {floor.connect_seconds:.2f} s",
            admit / floor.connect_seconds,
        )
    )
    for name, samples in (
        ("supply -> grant received, per enclave", result.supply_grant),
        (f"supply -> all {plan.per_borrower} enclaves' grants", result.supply_all),
    ):
        p50, p99 = statistics.median(samples), percentile(samples, 0.99)
        rows.append(
            _row(
                f"{name} p50 / p99 ({len(samples)})",
                f"{_ms(p50)} / {_ms(p99)}",
                "p99 target 20 ms",
                p99 / SUPPLY_GRANT_P99_S,
                _met(p99 <= SUPPLY_GRANT_P99_S),
            )
        )
    supply50 = statistics.median(result.supply_grant)
    all50, all99 = statistics.median(result.supply_all), percentile(result.supply_all, 0.99)
    for name, samples, versus, base in (
        (
            "supply -> the custodian starts sending the last grant p50 / p99 (its log)",
            result.supply_pushed,
            f"-> all grants received p99 {_ms(all99)}",
            None,
        ),
        (
            "supply POST -> its answer p50 / p99",
            result.supply_answer,
            "supply -> grant p50",
            supply50,
        ),
        (
            f"recall -> parked request served p50 / p99 ({len(result.recall_served)})",
            result.recall_served,
            "supply -> grant p50",
            supply50,
        ),
        (
            f"block -> all {plan.per_borrower} enclaves acknowledged p50 / p99 "
            f"({len(result.block_acked)})",
            result.block_acked,
            "supply -> all grants p50",
            all50,
        ),
    ):
        p50, p99 = statistics.median(samples), percentile(samples, 0.99)
        # The custodian's share is a share of the p99; the others compare medians.
        ratio = p99 / all99 if base is None else p50 / base
        rows.append(_row(name, f"{_ms(p50)} / {_ms(p99)}", versus, ratio))
    share = result.idle_custodian_cpu / result.idle_seconds
    floor_share = floor.server_cpu / floor.seconds
    rows.append(
        _row(
            f"custodian CPU at idle, {links} links ({links / HEARTBEAT_INTERVAL:.0f} "
            "heartbeats/s each way)",
            f"{share:.1%} of a core",
            f"echo floor {floor_share:.1%} ({floor.echoed / floor.seconds:.0f} echoes/s)",
            share / floor_share if floor_share else float("inf"),
            _met(share <= IDLE_CPU_SHARE or share <= IDLE_FLOOR_RATIO * floor_share),
        )
    )
    per_link = result.rss_per_link
    rows.append(
        _row(
            "custodian RSS per link",
            f"{per_link / 1024:.0f} KiB ({result.rss_no_links / 2**20:.0f} -> "
            f"{result.rss_links / 2**20:.0f} MiB)",
            "target 256 KiB",
            per_link / RSS_PER_LINK,
            _met(per_link <= RSS_PER_LINK),
        )
    )
    gen_share = result.idle_generator_cpu / result.idle_seconds
    rows += [
        "",
        f"load generator (this process, {links} light enclaves): {gen_share:.1%} of a core "
        f"at idle, RSS {result.generator_rss / 2**20:.0f} MiB; the floor's client "
        f"{floor.client_cpu / floor.seconds:.1%}",
        f"custodian log lines during the idle window: {result.idle_log_lines}",
        f"RSS after the idle window: {result.rss_after_idle / 2**20:.0f} MiB",
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 borrowers x 5 links, short")
    parser.add_argument("--borrowers", type=int, default=50)
    parser.add_argument("--per-borrower", type=int, default=20)
    parser.add_argument("--idle", type=float, default=20.0, help="idle window, seconds")
    parser.add_argument(
        "--rounds", type=int, default=100, help="supplies and parks timed (blocks: one a borrower)"
    )
    args = parser.parse_args()
    if args.quick:
        args.borrowers, args.per_borrower, args.idle, args.rounds = 4, 5, 3.0, 8
    plan = FleetPlan(
        borrowers=args.borrowers,
        per_borrower=args.per_borrower,
        supply_rounds=args.rounds,
        recall_rounds=args.rounds,
        block_rounds=min(args.rounds, args.borrowers),
        idle_seconds=args.idle,
    )
    # The simulated quotes each say so at warning level: once per light enclave.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    started = time.monotonic()

    def progress(step: str) -> None:
        print(f"  [{time.monotonic() - started:6.1f} s] {step}", file=sys.stderr, flush=True)

    # This process holds the other end of every link: its own full collections would
    # show up as the custodian's latency, so it runs with the custodian's settings.
    settle_heap()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="drm-fleet-") as workdir:
        result = trio.run(partial(run_fleet, Path(workdir), plan, log=progress))
    if mismatches := result.ledger_mismatches():
        raise SystemExit("the run went wrong:\n" + "\n".join(mismatches))
    progress(f"floor: {plan.links} TLS echo connections, {args.idle:g} s")
    floor = trio.run(echo_floor, plan.links, heartbeat_frame_size(), HEARTBEAT_INTERVAL, args.idle)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    end_load = os.getloadavg()
    print(f"fleet bench, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"command: python bench/fleet.py {shlex.join(sys.argv[1:])}")
    print(
        f"{plan.borrowers} borrowers x {plan.per_borrower} links, lease {plan.lease}; python "
        f"{platform.python_version()}, trio {trio.__version__}; {os.cpu_count()} cores; "
        f"RLIMIT_NOFILE {soft}/{hard}; load average {load[0]:.2f} at the start, "
        f"{end_load[0]:.2f} at the end; {time.monotonic() - started:.0f} s in all\n"
    )
    print("\n".join(report(result, floor)))


if __name__ == "__main__":
    main()

"""Ledger benchmark: durable usage ingest and supply latency, against raw sqlite3.

Run with ``python bench/ledger.py [DIR]`` (about half a minute). The database files go in
DIR (default: a temporary directory), which should be on the disk the custodian will
use: with ``synchronous=FULL`` every commit waits for an fsync, so the disk sets the pace.
Each figure is the median of ``RUNS`` runs, with [min-max].

Rows (all durable: WAL + ``synchronous=FULL``, one fsync per transaction):

* ingest, one report per transaction: ``Ledger.record_usage`` awaited in a loop, each
  report advancing one instance's cumulative count by ``PER_REPORT`` inferences (``1``:
  the enclave reports every inference; ``100``: it reports every 100, as cumulative
  reports allow, docs/links.md step 5). Baseline: a raw ``sqlite3`` INSERT + COMMIT per
  row, same pragmas, same run.
* ingest, batched: ``Ledger.record_usage_batch`` with ``BATCH`` reports (one per instance)
  per transaction, each advancing by ``BATCH_STEP``. Baseline: raw INSERT of ``BATCH``
  rows + one COMMIT.
* supply -> commit latency: ``await ledger.supply(...)`` from a trio task, p50/p99.
  Baseline: raw INSERT + COMMIT, called directly (no thread hop), p50/p99.

Target: >= 10,000 reported inferences per second recorded durably.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from drm_custodian.ledger import Ledger, UsageReport

RUNS = 5
SINGLE_REPORTS = 400
BATCHES = 40
BATCH = 100
BATCH_STEP = 10
SUPPLIES = 400
TARGET_INFERENCES_PER_S = 10_000


def _raw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (borrower TEXT, instance_id TEXT, n INTEGER, seq INTEGER)")
    return conn


def raw_commits(path: Path, count: int, rows: int) -> list[float]:
    """``count`` transactions of ``rows`` INSERTs each; returns seconds per transaction."""
    conn = _raw(path)
    times = []
    for i in range(count):
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO t VALUES ('acme', ?, ?, ?)", [(f"i{r}", i, i) for r in range(rows)]
        )
        conn.execute("COMMIT")
        times.append(time.perf_counter() - start)
    conn.close()
    return times


async def ledger_single(path: Path, per_report: int) -> float:
    """Inferences per second, one ``record_usage`` transaction per report."""
    ledger = await Ledger.open(path)
    await ledger.supply("acme", 1_000_000)
    await ledger.record_grant("acme", "inst", 1_000_000)
    start = time.perf_counter()
    for seq in range(1, SINGLE_REPORTS + 1):
        result = await ledger.record_usage("acme", "inst", seq * per_report, seq)
        assert result.advanced
        assert not result.over_grant
    elapsed = time.perf_counter() - start
    await ledger.aclose()
    return SINGLE_REPORTS * per_report / elapsed


async def ledger_batched(path: Path) -> float:
    """Inferences per second, ``BATCH`` reports per ``record_usage_batch`` transaction."""
    ledger = await Ledger.open(path)
    await ledger.supply("acme", 1_000_000)
    for i in range(BATCH):
        await ledger.record_grant("acme", f"inst-{i}", BATCHES * BATCH_STEP)
    start = time.perf_counter()
    for seq in range(1, BATCHES + 1):
        reports = [
            UsageReport(
                borrower="acme", instance_id=f"inst-{i}", served_total=seq * BATCH_STEP, seq=seq
            )
            for i in range(BATCH)
        ]
        await ledger.record_usage_batch(reports)
    elapsed = time.perf_counter() - start
    assert (await ledger.balance("acme")).served == BATCHES * BATCH * BATCH_STEP
    await ledger.aclose()
    return BATCHES * BATCH * BATCH_STEP / elapsed


async def supply_latencies(path: Path) -> list[float]:
    ledger = await Ledger.open(path)
    times = []
    for i in range(SUPPLIES):
        start = time.perf_counter()
        await ledger.supply("acme", 1, idempotency_key=f"k{i}")
        times.append(time.perf_counter() - start)
    await ledger.aclose()
    return times


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}-{fmt(max(values))}]"


def rate(value: float) -> str:
    return f"{value:,.0f}/s"


def micro(value: float) -> str:
    return f"{value * 1e6:,.0f} µs"


def main(directory: Path) -> None:
    rows: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    for run in range(RUNS):
        base = Path(tempfile.mkdtemp(prefix=f"run{run}-", dir=directory))
        raw_single = raw_commits(base / "raw1.db", SINGLE_REPORTS, 1)
        add("raw_single", 1 / statistics.mean(raw_single))
        raw_batch = raw_commits(base / "rawb.db", BATCHES, BATCH)
        add("raw_batch_rows", BATCH / statistics.mean(raw_batch))
        add("single_1", trio.run(ledger_single, base / "s1.db", 1))
        add("single_100", trio.run(ledger_single, base / "s100.db", 100))
        add("batched", trio.run(ledger_batched, base / "b.db"))
        supply = trio.run(supply_latencies, base / "sup.db")
        add("supply_p50", pct(supply, 0.5))
        add("supply_p99", pct(supply, 0.99))
        add("raw_p50", pct(raw_single, 0.5))
        add("raw_p99", pct(raw_single, 0.99))

    med = {name: statistics.median(values) for name, values in rows.items()}
    version = sys.version.split()[0]
    print(f"ledger bench: {RUNS} runs, python {version}, sqlite {sqlite3.sqlite_version}")
    print("every commit durable: WAL + synchronous=FULL\n")
    table = [
        ("1 report/tx, 1 inference each: inferences/s", "single_1", "raw_single", 1, rate),
        ("1 report/tx, 100 inferences each: inferences/s", "single_100", "raw_single", 100, rate),
        (
            f"batch of {BATCH} reports/tx, {BATCH_STEP} inferences each: inferences/s",
            "batched", "raw_batch_rows", BATCH_STEP, rate,
        ),
        ("supply -> commit p50", "supply_p50", "raw_p50", 1, micro),
        ("supply -> commit p99", "supply_p99", "raw_p99", 1, micro),
    ]  # fmt: skip
    print("| measure | ledger | raw sqlite3 baseline (same pragmas) | ratio |")
    print("| --- | --- | --- | --- |")
    for label, ours, raw, scale, fmt in table:
        baseline = summary([v * scale for v in rows[raw]], fmt)
        note = f" (x {scale} inferences per row)" if scale > 1 else ""
        ratio = med[ours] / (med[raw] * scale)
        print(f"| {label} | {summary(rows[ours], fmt)} | {baseline}{note} | {ratio:.2f}x |")
    best = max(med["single_100"], med["batched"])
    verdict = "met" if best >= TARGET_INFERENCES_PER_S else "NOT met"
    print(
        f"\ntarget >= {TARGET_INFERENCES_PER_S:,} reported inferences/s durably: {verdict} "
        f"(batched {med['batched']:,.0f}/s; 1 report per inference {med['single_1']:,.0f}/s)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument(
        "dir", nargs="?", type=Path, help="where the database files go (default: a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ledger-bench-", dir=args.dir) as tmp:
        main(Path(tmp))

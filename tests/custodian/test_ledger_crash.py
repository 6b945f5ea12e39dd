"""C04: a ledger writer SIGKILLed at random points loses no committed record, duplicates none.

A child process (a real interpreter, the real :class:`Ledger`) loops: supply with an
idempotency key (and retry it), grant to its instance, report usage (and replay a stale
report), and every few rounds a batch. It prints one line per record *after* the call
returned, i.e. after COMMIT, line-buffered. The parent reads a random number of lines
(seeded), SIGKILLs the child wherever it then is, keeps every complete line still in the
pipe, reopens the ledger and checks:

* ``PRAGMA integrity_check`` passes;
* every supply the child saw committed is there exactly once, under its key and id;
* every committed grant is there with the same instance and cumulative total (I6);
* every instance's recorded usage is at least what the child saw committed (I2/I4);
* the balance is consistent: served <= granted <= supplied, and nothing over-granted.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from drm_custodian.ledger import Ledger

KILLS = 20  # enough random kill points to matter, few enough for every CI run
SEED = 20261125

CHILD = """
import sys
import trio
from drm_custodian.ledger import Ledger, UsageReport

async def main(path, run):
    ledger = await Ledger.open(path)
    print("ready", flush=True)
    inst = f"inst-{run}"
    for i in range(100_000):
        key = f"r{run}-{i}"
        supply = await ledger.supply("acme", 3, idempotency_key=key)
        print(f"S {key} {supply.supply_id}", flush=True)
        assert await ledger.supply("acme", 3, idempotency_key=key) == supply  # a retry
        grant = await ledger.record_grant("acme", inst, 2)
        print(f"G {grant.grant_id} {inst} {grant.cumulative}", flush=True)
        served = grant.cumulative - 1
        if i % 3 == 2:
            reports = [UsageReport(borrower="acme", instance_id=inst, served_total=n, seq=n)
                       for n in (served - 1, served, served - 2)]
            await ledger.record_usage_batch(reports)
        else:
            await ledger.record_usage("acme", inst, served, seq=i)
        print(f"U {inst} {served}", flush=True)
        await ledger.record_usage("acme", inst, served - 1, seq=i)  # stale: changes nothing

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


class Committed:
    """What the children reported as committed, across all runs."""

    def __init__(self) -> None:
        self.supplies: dict[str, int] = {}
        self.grants: dict[int, tuple[str, int]] = {}
        self.usage: dict[str, int] = {}

    def add(self, line: str) -> None:
        kind, *fields = line.split()
        if kind == "S":
            self.supplies[fields[0]] = int(fields[1])
        elif kind == "G":
            self.grants[int(fields[0])] = (fields[1], int(fields[2]))
        elif kind == "U":
            self.usage[fields[0]] = max(self.usage.get(fields[0], 0), int(fields[1]))


async def _run_and_kill(path: Path, run: int, kill_after: int, committed: Committed) -> int:
    """Start a writer, SIGKILL it after ``kill_after`` lines; return the lines it committed."""
    argv = [sys.executable, "-c", CHILD, str(path), str(run)]
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(60):
        while buffer.count(b"\n") < kill_after:
            chunk = await process.stdout.receive_some()
            if not chunk:
                break
            buffer += chunk
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
        while chunk := await process.stdout.receive_some():  # lines already in the pipe
            buffer += chunk
    await process.stdout.aclose()
    lines = buffer.decode().split("\n")[:-1]  # a cut-off last line is not a report
    for line in lines:
        committed.add(line)
    return len(lines)


def _check_rows(path: Path, committed: Committed) -> None:
    conn = sqlite3.connect(path)
    try:
        for key, supply_id in committed.supplies.items():
            rows = conn.execute("SELECT id FROM supplies WHERE idempotency_key=?", (key,))
            assert rows.fetchall() == [(supply_id,)], key
        dupes = "SELECT COUNT(*) - COUNT(DISTINCT idempotency_key) FROM supplies"
        assert conn.execute(dupes).fetchone() == (0,)
        for grant_id, expected in committed.grants.items():
            rows = conn.execute(
                "SELECT instance_id, cumulative FROM grants WHERE grant_id=?", (grant_id,)
            )
            assert rows.fetchall() == [expected], grant_id
        for instance, served in committed.usage.items():
            row = conn.execute(
                "SELECT MAX(served_total) FROM usage WHERE instance_id=?", (instance,)
            )
            assert row.fetchone()[0] >= served, instance
        assert conn.execute("SELECT COUNT(*) FROM usage WHERE over_grant").fetchone() == (0,)
    finally:
        conn.close()


@pytest.mark.slow
async def test_sigkill_at_random_points_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    rng = random.Random(SEED)
    committed = Committed()
    lines_seen = 0
    for run in range(KILLS):
        lines_seen += await _run_and_kill(path, run, rng.randint(1, 40), committed)
        ledger = await Ledger.open(path)
        try:
            await ledger.integrity_check()
            balance = await ledger.balance("acme")
        finally:
            await ledger.aclose()
        _check_rows(path, committed)
        assert balance.served <= balance.granted <= balance.supplied
        assert balance.in_doubt == balance.granted - balance.served
        assert balance.supplied >= 3 * len(committed.supplies)
        assert balance.granted >= 2 * len(committed.grants)
    # The loop really ran into the middle of the work, not only into start-up.
    assert len(committed.grants) > KILLS
    assert lines_seen > 2 * KILLS

"""The ledger's bookkeeping: supplies, grants, usage reports, blocks and derived balances.

Each test opens a real SQLite file (WAL + FULL) in ``tmp_path``; nothing is mocked.
Crash safety with real processes lives in ``test_ledger_crash.py``.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from drm_custodian.ledger import (
    SCHEMA_VERSION,
    Balance,
    BorrowerBlocked,
    IdempotencyConflict,
    InsufficientSupply,
    Ledger,
    LedgerInputError,
    LedgerStorageError,
    UsageReport,
)
from drm_wire.errors import DrmError
from drm_wire.limits import MAX_GRANT_UNITS

INSTANCE = "a" * 64  # instance ids are hex digests of the RA-TLS key
#: Ledger files written by earlier versions of this code (tests/data/README.md).
DATA = Path(__file__).resolve().parents[1] / "data" / "ledger"


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


# --- opening -------------------------------------------------------------------------


async def test_open_makes_a_wal_full_database_with_a_version(
    ledger: Ledger, ledger_path: Path
) -> None:
    conn = _raw(ledger_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        conn.close()
    assert repr(ledger) == "<Ledger open>"


async def test_reopen_keeps_records(ledger_path: Path) -> None:
    first = await Ledger.open(ledger_path)
    await first.supply("acme", 7)
    await first.aclose()
    second = await Ledger.open(ledger_path)
    try:
        assert (await second.balance("acme")).supplied == 7
        await second.integrity_check()
    finally:
        await second.aclose()


async def test_open_refuses_a_database_that_cannot_be_wal() -> None:
    with pytest.raises(LedgerStorageError, match="not 'wal'"):
        await Ledger.open(":memory:")


async def test_open_refuses_another_schema_version(ledger: Ledger, ledger_path: Path) -> None:
    await ledger.aclose()
    conn = _raw(ledger_path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(LedgerStorageError, match="schema version 99"):
        await Ledger.open(ledger_path)


def _as_version_1(path: Path) -> None:
    """Turn a ledger file into what version 1 wrote: the records, no totals."""
    conn = _raw(path)
    try:
        conn.execute("BEGIN")
        for trigger in ("supplies_total", "grants_total", "usage_total"):
            conn.execute(f"DROP TRIGGER {trigger}")
        conn.execute("DROP TABLE returns")  # version 4's, with their triggers
        conn.execute("DROP TABLE reclaims")
        conn.execute("DROP TABLE borrower_totals")
        conn.execute("DROP TABLE instance_totals")
        conn.execute("ALTER TABLE usage DROP COLUMN requests_total")  # version 3's
        conn.execute("UPDATE schema_version SET version = 1")
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_a_version_1_file_gains_totals_that_match_its_records(ledger_path: Path) -> None:
    first = await Ledger.open(ledger_path)
    await first.supply("acme", 50)
    await first.supply("zeta", 3)
    await first.record_grant("acme", INSTANCE, 20)
    await first.record_grant("acme", INSTANCE, 5)
    await first.record_grant("acme", "b" * 64, 10)
    await first.record_usage("acme", INSTANCE, 18, 1)
    await first.record_usage("acme", "b" * 64, 4, 1)
    before = await first.balance("acme")
    await first.aclose()
    _as_version_1(ledger_path)

    with capture_logs() as logs:
        second = await Ledger.open(ledger_path)
    try:
        assert {"event": "ledger_upgraded", "from_version": 1, "to_version": 4} in [
            {k: v for k, v in e.items() if k != "log_level"} for e in logs
        ]
        # Before version 3 a request was one unit: its requests are its inferences.
        assert (
            await second.balance("acme")
            == dataclasses.replace(before, requests=22)
            == Balance(supplied=50, granted=35, served=22, in_doubt=13, remaining=15,
                       blocked=False, requests=22)
        )  # fmt: skip
        assert (await second.balance("zeta")).supplied == 3
        await second.integrity_check()
        await second.record_usage("acme", INSTANCE, 25, 2)  # the triggers work after it
        assert (await second.balance("acme")).served == 29
    finally:
        await second.aclose()
    conn = _raw(ledger_path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(4,)]
    finally:
        conn.close()


async def test_a_real_version_2_file_counts_its_requests(tmp_path: Path) -> None:
    """``tests/data/ledger/v2.sqlite`` was written by the version 2 code: opened now, it is
    upgraded in place, keeps every balance, and counts requests from then on."""
    path = tmp_path / "ledger.sqlite"
    shutil.copyfile(DATA / "v2.sqlite", path)
    conn = _raw(path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    finally:
        conn.close()
    with capture_logs() as logs:
        ledger = await Ledger.open(path)
    try:
        assert {"event": "ledger_upgraded", "from_version": 2, "to_version": 4} in [
            {k: v for k, v in e.items() if k != "log_level"} for e in logs
        ]
        assert await ledger.balance("acme") == Balance(
            supplied=50, granted=35, served=22, in_doubt=13, remaining=15, blocked=False,
            requests=22,
        )  # fmt: skip
        await ledger.integrity_check()
        # A batch of 7 inferences in one request, then 3 single ones: 10 and 4.
        await ledger.record_usage("acme", "a" * 32, 28, 2, requests_total=22)
        balance = await ledger.balance("acme")
        assert (balance.served, balance.requests) == (32, 26)
        await ledger.integrity_check()
        with pytest.raises(LedgerInputError, match="requests_total"):
            await ledger.record_usage("acme", "a" * 32, 30, 3, requests_total=31)
    finally:
        await ledger.aclose()
    # Opened again: already the current version, nothing to do.
    with capture_logs() as logs:
        again = await Ledger.open(path)
    await again.aclose()
    assert not [e for e in logs if e["event"] == "ledger_upgraded"]


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE instance_totals SET served = served + 1",
        "UPDATE instance_totals SET granted = granted - 1",
        "UPDATE borrower_totals SET supplied = 1",
        "DELETE FROM instance_totals",
        "INSERT INTO borrower_totals VALUES ('ghost', 5)",
    ],
)
async def test_integrity_check_refuses_totals_that_differ_from_the_records(
    ledger: Ledger, ledger_path: Path, tamper: str
) -> None:
    await ledger.supply("acme", 50)
    await ledger.record_grant("acme", INSTANCE, 20)
    await ledger.record_usage("acme", INSTANCE, 7, 1)
    await ledger.integrity_check()
    conn = _raw(ledger_path)
    try:
        conn.execute(tamper)
    finally:
        conn.close()
    with pytest.raises(LedgerStorageError, match="totals do not match its records"):
        await ledger.integrity_check()


async def test_a_balance_reads_the_totals_never_the_records(ledger_path: Path) -> None:
    """Its cost must not grow with the months of usage rows a daemon accumulates."""
    from drm_custodian.ledger import _BALANCE  # the statement itself is what is checked

    ledger = await Ledger.open(ledger_path)
    await ledger.aclose()
    conn = _raw(ledger_path)
    try:
        plan = " ".join(
            str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {_BALANCE}", {"b": "x"})
        )
    finally:
        conn.close()
    assert "SEARCH instance_totals USING PRIMARY KEY" in plan
    for records in ("supplies", "grants", "usage"):
        assert records not in plan


async def test_open_refuses_an_sqlite_too_old_for_the_totals(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 23, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.23.1")
    with pytest.raises(LedgerStorageError, match=r"SQLite 3\.23\.1 is too old: needs 3\.24\.0\+"):
        await Ledger.open(ledger_path)
    assert not await trio.Path(ledger_path).exists()  # nothing was created


async def test_open_maps_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "junk.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerStorageError) as caught:
        await Ledger.open(path)
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    assert isinstance(caught.value, DrmError)


async def test_tables_are_append_only(ledger: Ledger, ledger_path: Path) -> None:
    await ledger.supply("acme", 5)
    conn = _raw(ledger_path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE supplies SET units = 500")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM supplies")
    finally:
        conn.close()


async def test_closed_ledger_refuses_calls(ledger: Ledger) -> None:
    await ledger.aclose()
    await ledger.aclose()  # idempotent
    assert repr(ledger) == "<Ledger closed>"
    with pytest.raises(trio.ClosedResourceError):
        await ledger.balance("acme")


async def test_sqlite_failure_inside_a_transaction_rolls_back_and_is_mapped(
    ledger: Ledger,
) -> None:
    """C02: a failing statement leaves no partial row and surfaces as LedgerStorageError."""

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO supplies (borrower, units, at) VALUES ('acme', 5, 0)")
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    with pytest.raises(LedgerStorageError) as caught:
        await ledger._run(half_then_fail)
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    assert (await ledger.balance("acme")).supplied == 0


# --- supplies and idempotency --------------------------------------------------------


async def test_supply_adds_to_the_balance(ledger: Ledger) -> None:
    first = await ledger.supply("acme", 10)
    second = await ledger.supply("acme", 5)
    assert second.supply_id > first.supply_id
    assert first.balance == Balance(10, 0, 0, 0, 10, False)  # read in the same transaction
    assert await ledger.balance("acme") == second.balance == Balance(15, 0, 0, 0, 15, False)
    assert await ledger.balance("other") == Balance(0, 0, 0, 0, 0, False)


async def test_retried_supply_with_the_same_key_counts_once(ledger: Ledger) -> None:
    original = await ledger.supply("acme", 10, idempotency_key="req-1")
    retried = await ledger.supply("acme", 10, idempotency_key="req-1")
    assert retried == original
    assert retried.replayed
    assert not original.replayed
    assert retried.at == original.at  # the original record, not a new one
    assert retried.balance.supplied == original.balance.supplied == 10
    assert (await ledger.balance("acme")).supplied == 10


async def test_concurrent_retries_with_one_key_count_once(ledger: Ledger) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(lambda: ledger.supply("acme", 3, idempotency_key="burst"))
    assert (await ledger.balance("acme")).supplied == 3


@pytest.mark.parametrize(("borrower", "units"), [("acme", 11), ("globex", 10)])
async def test_a_key_reused_for_another_supply_is_refused(
    ledger: Ledger, borrower: str, units: int
) -> None:
    await ledger.supply("acme", 10, idempotency_key="req-1")
    with pytest.raises(IdempotencyConflict):
        await ledger.supply(borrower, units, idempotency_key="req-1")
    assert (await ledger.balance(borrower)).supplied == (10 if borrower == "acme" else 0)


# --- grants --------------------------------------------------------------------------


async def test_grants_carry_the_instance_cumulative_total(ledger: Ledger) -> None:
    await ledger.supply("acme", 100)
    first = await ledger.record_grant("acme", INSTANCE, 10)
    second = await ledger.record_grant("acme", INSTANCE, 5)
    other = await ledger.record_grant("acme", "b" * 64, 7)
    assert (first.cumulative, second.cumulative, other.cumulative) == (10, 15, 7)
    assert second.grant_id > first.grant_id
    assert await ledger.balance("acme") == Balance(100, 22, 0, 22, 78, False)


async def test_a_grant_beyond_remaining_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    await ledger.supply("acme", 10)
    await ledger.record_grant("acme", INSTANCE, 8)
    with pytest.raises(InsufficientSupply) as caught:
        await ledger.record_grant("acme", INSTANCE, 3)
    assert (caught.value.borrower, caught.value.remaining) == ("acme", 2)
    assert (await ledger.balance("acme")).granted == 8
    assert (await ledger.record_grant("acme", INSTANCE, 2)).cumulative == 10


async def test_grant_due_reads_and_grants_in_one_call(ledger: Ledger) -> None:
    await ledger.supply("acme", 10)
    seen: list[tuple[Balance, int, int]] = []

    def plan(balance: Balance, granted: int, served: int) -> int:
        seen.append((balance, granted, served))
        return min(balance.remaining, 4)

    balance, grant = await ledger.grant_due("acme", INSTANCE, plan)
    assert seen == [(balance, 0, 0)] == [(Balance(10, 0, 0, 0, 10, False), 0, 0)]
    assert grant is not None
    assert (grant.units, grant.cumulative) == (4, 4)
    assert (await ledger.balance("acme")).granted == 4

    await ledger.record_usage("acme", INSTANCE, 3, 1)
    balance, grant = await ledger.grant_due("acme", INSTANCE, plan)  # sees its totals
    assert seen[-1] == (Balance(10, 4, 3, 1, 6, False), 4, 3)
    assert grant is not None
    assert grant.cumulative == 8

    balance, grant = await ledger.grant_due("acme", INSTANCE, lambda *_: 0)  # nothing due
    assert (balance.granted, grant) == (8, None)
    assert (await ledger.balance("acme")).granted == 8


async def test_a_supply_grants_the_named_instances_in_its_own_transaction(
    ledger: Ledger,
) -> None:
    await ledger.supply("acme", 4)
    await ledger.record_grant("acme", INSTANCE, 4)
    await ledger.record_usage("acme", INSTANCE, 4, 1)
    seen: list[tuple[int, int, int]] = []

    def plan(balance: Balance, granted: int, served: int) -> int:
        seen.append((balance.remaining, granted, served))
        return min(balance.remaining, 6)

    other = "b" * 64
    result = await ledger.supply("acme", 10, grant_to=[(INSTANCE, plan), (other, plan)])
    assert seen == [(10, 4, 4), (4, 0, 0)]  # each plan sees what the one before left
    assert [(g.instance_id, g.units, g.cumulative) for g in result.grants] == [
        (INSTANCE, 6, 10),
        (other, 4, 4),
    ]
    assert result.balance == Balance(14, 14, 4, 10, 0, False) == await ledger.balance("acme")
    await ledger.integrity_check()

    again = await ledger.supply("acme", 2, idempotency_key="k", grant_to=[(other, plan)])
    retried = await ledger.supply("acme", 2, idempotency_key="k", grant_to=[(other, plan)])
    assert (again.replayed, retried.replayed) == (False, True)
    assert [g.cumulative for g in again.grants] == [6]
    assert retried.grants == ()  # planned again, but nothing is left to grant
    assert (await ledger.balance("acme")).supplied == 16


async def test_a_supply_whose_plan_fails_records_nothing(ledger: Ledger) -> None:
    with pytest.raises(InsufficientSupply):
        await ledger.supply("acme", 5, grant_to=[(INSTANCE, lambda balance, *_: 6)])
    with pytest.raises(LedgerInputError, match="instance_id"):
        await ledger.supply("acme", 5, grant_to=[("", lambda *_: 1)])
    assert await ledger.balance("acme") == Balance(0, 0, 0, 0, 0, False)


async def test_a_supply_to_a_blocked_borrower_plans_no_grant(ledger: Ledger) -> None:
    await ledger.set_blocked("acme", True, "audit")

    def plan(balance: Balance, granted: int, served: int) -> int:
        raise AssertionError("a blocked borrower's grant is not even planned")

    result = await ledger.supply("acme", 5, grant_to=[(INSTANCE, plan)])
    assert (result.grants, result.balance.remaining) == ((), 5)


async def test_grant_due_grants_nothing_to_a_blocked_borrower(ledger: Ledger) -> None:
    await ledger.supply("acme", 10)
    await ledger.set_blocked("acme", True, "audit")

    def plan(balance: Balance, granted: int, served: int) -> int:
        raise AssertionError("a blocked borrower's grant is not even planned")

    balance, grant = await ledger.grant_due("acme", INSTANCE, plan)
    assert (balance.blocked, balance.remaining, grant) == (True, 10, None)


async def test_grant_due_refuses_a_plan_beyond_the_balance(ledger: Ledger) -> None:
    await ledger.supply("acme", 3)
    with pytest.raises(InsufficientSupply):
        await ledger.grant_due("acme", INSTANCE, lambda balance, *_: balance.remaining + 1)
    with pytest.raises(LedgerInputError):
        await ledger.grant_due("acme", INSTANCE, lambda *_: -1)
    assert (await ledger.balance("acme")).granted == 0


async def test_a_grant_with_no_supply_is_refused(ledger: Ledger) -> None:
    with pytest.raises(InsufficientSupply):
        await ledger.record_grant("acme", INSTANCE, 1)


async def test_concurrent_grants_never_over_issue(ledger: Ledger) -> None:
    """I1 under contention: 60 one-unit grants against a supply of 50."""
    await ledger.supply("acme", 50)
    outcomes: list[bool] = []

    async def grant_one(i: int) -> None:
        try:
            await ledger.record_grant("acme", f"inst-{i % 3}", 1)
        except InsufficientSupply:
            outcomes.append(False)
        else:
            outcomes.append(True)

    async with trio.open_nursery() as nursery:
        for i in range(60):
            nursery.start_soon(grant_one, i)
    assert outcomes.count(True) == 50
    assert await ledger.balance("acme") == Balance(50, 50, 0, 50, 0, False)


async def test_a_blocked_borrower_gets_no_grant_until_unblocked(ledger: Ledger) -> None:
    await ledger.supply("acme", 10)
    await ledger.set_blocked("acme", True, "invoice unpaid")
    assert (await ledger.balance("acme")).blocked
    with pytest.raises(BorrowerBlocked) as caught:
        await ledger.record_grant("acme", INSTANCE, 1)
    assert caught.value.remaining == 10
    await ledger.supply("acme", 5)  # a top-up is still recorded; it is the grant that stops
    await ledger.set_blocked("acme", False, "")
    assert (await ledger.record_grant("acme", INSTANCE, 15)).cumulative == 15
    assert not (await ledger.balance("acme")).blocked


# --- usage ---------------------------------------------------------------------------


async def test_duplicate_reordered_and_replayed_reports_count_once(ledger: Ledger) -> None:
    """I4 / Q04: the recorded value is the max of the reports, whatever their order."""
    await ledger.supply("acme", 20)
    await ledger.record_grant("acme", INSTANCE, 20)
    first = await ledger.record_usage("acme", INSTANCE, 5, seq=1)
    assert (first.served_total, first.advanced, first.over_grant) == (5, True, False)
    duplicate = await ledger.record_usage("acme", INSTANCE, 5, seq=1)
    assert (duplicate.served_total, duplicate.advanced) == (5, False)
    newer = await ledger.record_usage("acme", INSTANCE, 9, seq=3)
    reordered = await ledger.record_usage("acme", INSTANCE, 7, seq=2)  # seq 2 arrives late
    assert (newer.advanced, reordered.advanced, reordered.served_total) == (True, False, 9)
    replayed = await ledger.record_usage("acme", INSTANCE, 0, seq=0)
    assert replayed.served_total == 9
    assert await ledger.balance("acme") == Balance(20, 20, 9, 11, 0, False)


async def test_served_sums_the_max_of_each_instance(ledger: Ledger) -> None:
    await ledger.supply("acme", 30)
    for name, units, served in (("one", 10, 4), ("two", 10, 10), ("three", 5, 0)):
        await ledger.record_grant("acme", name, units)
        await ledger.record_usage("acme", name, served, seq=1)
    assert await ledger.balance("acme") == Balance(30, 25, 14, 11, 5, False)


async def test_a_report_above_the_grant_is_recorded_and_flagged(ledger: Ledger) -> None:
    await ledger.supply("acme", 10)
    await ledger.record_grant("acme", "good", 5)
    await ledger.record_grant("acme", "rogue", 5)
    with capture_logs() as logs:
        result = await ledger.record_usage("acme", "rogue", 8, seq=1)
        again = await ledger.record_usage("acme", "rogue", 8, seq=1)
    assert (result.over_grant, result.granted, result.served_total) == (True, 5, 8)
    assert again.over_grant
    assert [entry["event"] for entry in logs] == ["usage_over_grant"]  # logged once
    assert logs[0]["instance_id"] == "rogue"
    # The rogue's excess does not cancel the good instance's in-doubt units.
    assert await ledger.balance("acme") == Balance(10, 10, 8, 5, 0, False)


async def test_a_report_for_an_instance_never_granted_is_flagged(ledger: Ledger) -> None:
    with capture_logs():
        result = await ledger.record_usage("acme", "ghost", 1, seq=0)
    assert (result.granted, result.over_grant) == (0, True)


async def test_a_batch_applies_reports_in_order_in_one_transaction(ledger: Ledger) -> None:
    await ledger.supply("acme", 100)
    await ledger.record_grant("acme", "one", 50)
    await ledger.record_grant("acme", "two", 50)
    reports = [
        UsageReport(borrower="acme", instance_id="one", served_total=10, seq=1),
        UsageReport(borrower="acme", instance_id="two", served_total=3, seq=1),
        UsageReport(borrower="acme", instance_id="one", served_total=8, seq=0),
        UsageReport(borrower="acme", instance_id="one", served_total=12, seq=2),
    ]
    results = await ledger.record_usage_batch(reports)
    assert [(r.served_total, r.advanced) for r in results] == [
        (10, True),
        (3, True),
        (10, False),
        (12, True),
    ]
    assert (await ledger.balance("acme")).served == 15
    assert await ledger.record_usage_batch([]) == []


async def test_a_batch_with_a_bad_item_writes_nothing(ledger: Ledger) -> None:
    good = UsageReport(borrower="acme", instance_id="one", served_total=1, seq=1)
    with pytest.raises(LedgerInputError, match="reports"):
        await ledger.record_usage_batch([good, ("acme", "one", 2, 2)])  # type: ignore[list-item]
    assert (await ledger.balance("acme")).served == 0


# --- validation at the edge ----------------------------------------------------------

BAD_UNITS = [True, False, 0, -1, MAX_GRANT_UNITS + 1, 1.0, "5", None]
BAD_NAMES = ["", "x" * 129, "a\nb", "\x1b[31mred", "tab\there", 5, b"acme", None]


@pytest.mark.parametrize("units", BAD_UNITS)
async def test_supply_refuses_bad_units(ledger: Ledger, units: object) -> None:
    with pytest.raises(LedgerInputError) as caught:
        await ledger.supply("acme", units)  # type: ignore[arg-type]
    assert caught.value.field == "units"
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("units", BAD_UNITS)
async def test_grant_refuses_bad_units(ledger: Ledger, units: object) -> None:
    await ledger.supply("acme", MAX_GRANT_UNITS)
    with pytest.raises(LedgerInputError):
        await ledger.record_grant("acme", INSTANCE, units)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_names_must_be_bounded_printable_strings(ledger: Ledger, name: object) -> None:
    with pytest.raises(LedgerInputError, match="borrower"):
        await ledger.supply(name, 1)  # type: ignore[arg-type]
    with pytest.raises(LedgerInputError, match="instance_id"):
        await ledger.record_grant("acme", name, 1)  # type: ignore[arg-type]
    if name is not None:  # None means "no key"
        with pytest.raises(LedgerInputError, match="idempotency_key"):
            await ledger.supply("acme", 1, idempotency_key=name)  # type: ignore[arg-type]
    assert (await ledger.balance("acme")).supplied == 0


async def test_limits_are_inclusive(ledger: Ledger) -> None:
    await ledger.supply("x" * 128, MAX_GRANT_UNITS)
    assert (await ledger.balance("x" * 128)).supplied == MAX_GRANT_UNITS


@pytest.mark.parametrize(
    ("served_total", "seq"), [(-1, 0), (0, -1), (True, 0), (0, 2**63), (1.5, 0)]
)
async def test_usage_refuses_bad_counts(ledger: Ledger, served_total: object, seq: object) -> None:
    with pytest.raises(LedgerInputError):
        await ledger.record_usage("acme", INSTANCE, served_total, seq)  # type: ignore[arg-type]


async def test_block_refuses_bad_arguments(ledger: Ledger) -> None:
    with pytest.raises(LedgerInputError, match="blocked"):
        await ledger.set_blocked("acme", 1, "int is not bool")  # type: ignore[arg-type]
    with pytest.raises(LedgerInputError, match="reason"):
        await ledger.set_blocked("acme", True, "line\nbreak")
    assert not (await ledger.balance("acme")).blocked


async def test_last_grant_and_served_total_of_an_instance(ledger: Ledger) -> None:
    assert await ledger.last_grant("acme", "i-1") is None
    assert await ledger.served_total("acme", "i-1") == 0
    await ledger.supply("acme", 10)
    await ledger.record_grant("acme", "i-1", 3)
    await ledger.record_grant("acme", "i-2", 2)
    second = await ledger.record_grant("acme", "i-1", 4)
    last = await ledger.last_grant("acme", "i-1")
    assert last == second
    assert last is not None
    assert (last.units, last.cumulative) == (4, 7)
    await ledger.record_usage("acme", "i-1", 5, 1)
    await ledger.record_usage("acme", "i-1", 2, 2)  # stale: the maximum stands
    assert await ledger.served_total("acme", "i-1") == 5
    assert await ledger.served_total("acme", "i-2") == 0


async def test_totals_follow_a_random_history_of_records(ledger: Ledger) -> None:
    """Seeded random supplies, grants, replayed and reordered reports: the totals the
    triggers keep equal both a plain model of the rules and the records themselves."""
    rng = random.Random(20261126)
    instances = [("acme", "a" * 64), ("acme", "b" * 64), ("zeta", "c" * 64)]
    supplied = {"acme": 0, "zeta": 0}
    granted = {key: 0 for key in instances}
    served = {key: 0 for key in instances}
    for seq in range(1, 301):
        borrower, instance = key = rng.choice(instances)
        action = rng.random()
        if action < 0.2:
            units = rng.randint(1, 40)
            await ledger.supply(borrower, units)
            supplied[borrower] += units
        elif action < 0.5:
            remaining = supplied[borrower] - sum(
                g for (b, _), g in granted.items() if b == borrower
            )
            if remaining:
                units = rng.randint(1, remaining)
                await ledger.record_grant(borrower, instance, units)
                granted[key] += units
        else:  # any count, old or new: a replay or a reordering changes nothing
            count = rng.randint(0, granted[key] + 2)
            await ledger.record_usage(borrower, instance, count, seq)
            served[key] = max(served[key], count)
    await ledger.integrity_check()
    for borrower in supplied:
        mine = [key for key in instances if key[0] == borrower]
        want_granted = sum(granted[k] for k in mine)
        assert await ledger.balance(borrower) == Balance(
            supplied=supplied[borrower],
            granted=want_granted,
            served=sum(served[k] for k in mine),
            in_doubt=sum(max(granted[k] - served[k], 0) for k in mine),
            remaining=supplied[borrower] - want_granted,
            blocked=False,
        )


# --- one read for /usage ---------------------------------------------------------------


async def test_usage_reads_totals_and_instances_in_one_snapshot(
    ledger: Ledger, ledger_path: Path
) -> None:
    """A grant committed by another connection between the balance's read and the
    instances' read is in neither: the rows add up to the totals (GET /usage)."""
    await ledger.supply("acme", 100)
    await ledger.record_grant("acme", INSTANCE, 10)
    # The callback runs in the ledger's thread.
    writer = sqlite3.connect(ledger_path, isolation_level=None, check_same_thread=False)
    statements: list[str] = []
    failures: list[BaseException] = []

    def between_reads(statement: str) -> None:
        statements.append(statement)
        if "FROM instance_totals t" in statement and len(statements) > 1:
            try:  # (sqlite3 swallows a trace callback's exceptions)
                writer.execute(
                    "INSERT INTO grants (borrower, instance_id, units, cumulative, at) "
                    "VALUES ('acme', ?, 20, 20, 0)",
                    ("b" * 64,),
                )
            except BaseException as exc:
                failures.append(exc)

    conn = ledger._conn
    assert conn is not None
    conn.set_trace_callback(between_reads)
    try:
        balance, records = await ledger.usage("acme", newest_first=True)
    finally:
        conn.set_trace_callback(None)
    assert any("FROM instance_totals t" in s for s in statements)
    assert failures == []  # the write did happen, between the two reads
    assert balance.granted == sum(r.granted for r in records) == 10
    # A later read sees it, in both.
    balance, records = await ledger.usage("acme")
    assert balance.granted == sum(r.granted for r in records) == 30
    writer.close()

"""Ledger schema 4: confirmed returns (I20) and the owner's write-offs (I21), apart.

Real SQLite files throughout; the upgrade is tested from a file the schema-3 code wrote.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from drm_custodian.ledger import (
    SCHEMA_VERSION,
    Balance,
    InstanceRetired,
    Ledger,
    LedgerInputError,
    LedgerStorageError,
    ReclaimRefused,
)

A = "a" * 32
B = "b" * 32
DATA = Path(__file__).resolve().parents[1] / "data" / "ledger"


async def _returned(ledger: Ledger, instance: str, returned: int, served: int, **kw: object):  # type: ignore[no-untyped-def]
    return await ledger.record_return(
        "acme",
        instance,
        returned_total=returned,
        served_total=served,
        requests_total=kw.pop("requests", served),  # type: ignore[arg-type]
        final=kw.pop("final", True),  # type: ignore[arg-type]
        recall_id=kw.pop("recall_id", None),  # type: ignore[arg-type]
    )


async def test_a_real_version_3_file_is_upgraded_and_settles(tmp_path: Path) -> None:
    """``tests/data/ledger/v3.sqlite`` was written by the schema-3 code: opened now it is
    upgraded in place in one step, keeps every balance, and takes returns and
    write-offs from then on."""
    path = tmp_path / "ledger.sqlite"
    shutil.copyfile(DATA / "v3.sqlite", path)
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(3,)]
    finally:
        raw.close()
    with capture_logs() as logs:
        ledger = await Ledger.open(path)
    try:
        assert {"event": "ledger_upgraded", "from_version": 3, "to_version": SCHEMA_VERSION} in [
            {k: v for k, v in e.items() if k != "log_level"} for e in logs
        ]
        # acme: supplied 100; a granted 40, served 25 (12 requests); b granted 20, served 20.
        assert await ledger.balance("acme") == Balance(
            supplied=100, granted=60, served=45, in_doubt=15, remaining=40, blocked=False,
            requests=32, returned=0, reclaimed=0,
        )  # fmt: skip
        assert (await ledger.balance("zeta")).blocked
        await ledger.integrity_check()
        records = {r.instance_id: r for r in await ledger.instances("acme")}
        assert (records[A].in_doubt, records[A].retired) == (15, None)
        assert (records[B].in_doubt, records[B].retired) == (0, None)
        # a stops cleanly: 2 more served, 13 back; the supply gets them at once.
        result = await _returned(ledger, A, 13, 27, requests=13)
        assert (result.returned_total, result.credited, result.refused) == (13, 13, None)
        balance = await ledger.balance("acme")
        assert (balance.in_doubt, balance.remaining, balance.returned) == (0, 53, 13)
        # b crashed with nothing in doubt; the owner writes it off: 0 units, id retired.
        written = await ledger.reclaim("acme", B)
        assert written.units == 0
        assert written.balance.reclaimed == 0
        await ledger.integrity_check()
    finally:
        await ledger.aclose()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(4,)]
        assert raw.execute("SELECT COUNT(*) FROM returns").fetchone() == (1,)
        assert raw.execute("SELECT COUNT(*) FROM reclaims").fetchone() == (1,)
    finally:
        raw.close()


async def test_a_return_is_credited_once_and_only_within_granted_minus_served(
    ledger: Ledger,
) -> None:
    await ledger.supply("acme", 100)
    await ledger.record_grant("acme", A, 30)
    await ledger.record_usage("acme", A, 10, 1, requests_total=10)
    # A hostile enclave returns more than it holds: refused, nothing credited.
    with capture_logs():
        refused = await _returned(ledger, A, 21, 10, final=False, recall_id=1)
    assert refused.refused is not None
    assert "exceeds the 30 granted" in refused.refused
    assert (refused.credited, refused.returned_total) == (0, 0)
    assert (await ledger.balance("acme")).remaining == 70
    # ... or hides what it served to return more: the served total is the larger one.
    hidden = await _returned(ledger, A, 25, 5, final=False, recall_id=2)
    assert hidden.refused is not None
    assert hidden.served_total == 10
    # A true return of 5 (recall), then the same message replayed: credited once.
    first = await _returned(ledger, A, 5, 12, final=False, recall_id=3)
    again = await _returned(ledger, A, 5, 12, final=False, recall_id=3)
    assert (first.credited, again.credited) == (5, 0)
    assert again.returned_total == 5
    # A total that goes back is refused and credits nothing.
    back = await _returned(ledger, A, 4, 12, final=False, recall_id=4)
    assert back.refused is not None
    assert "below the recorded 5" in back.refused
    balance = await ledger.balance("acme")
    assert (balance.remaining, balance.in_doubt, balance.returned, balance.served) == (
        75,
        13,
        5,
        12,
    )
    # The final return: the rest that is idle; the instance is stopped and gets nothing more.
    final = await _returned(ledger, A, 18, 12)
    assert (final.credited, final.returned_total) == (13, 18)
    record = await ledger.instance("acme", A)
    assert record is not None
    assert (record.in_doubt, record.retired, record.stopped) == (0, "stopped", True)
    with pytest.raises(InstanceRetired):
        await ledger.record_grant("acme", A, 1)
    # A supply naming the stopped instance still stands, and grants it nothing.
    result = await ledger.supply("acme", 5, grant_to=[(A, lambda *_: 1)])
    assert result.grants == ()
    assert (await ledger.balance("acme")).remaining == 100 - 30 + 18 + 5
    await ledger.integrity_check()


async def test_return_inputs_are_checked(ledger: Ledger) -> None:
    with pytest.raises(LedgerInputError, match="returned_total"):
        await _returned(ledger, A, -1, 0)
    with pytest.raises(LedgerInputError, match="final"):
        await _returned(ledger, A, 0, 0, final=1)
    with pytest.raises(LedgerInputError, match="requests_total"):
        await _returned(ledger, A, 0, 1, requests=2)


async def test_a_write_off_is_its_own_record_once_per_instance(ledger: Ledger) -> None:
    await ledger.supply("acme", 100)
    await ledger.record_grant("acme", A, 30)
    await ledger.record_usage("acme", A, 7, 1, requests_total=7)
    with pytest.raises(ReclaimRefused, match="no instance"):
        await ledger.reclaim("acme", B)
    written = await ledger.reclaim("acme", A)
    assert written.units == 23
    balance = written.balance
    assert (balance.in_doubt, balance.reclaimed, balance.returned, balance.remaining) == (
        0,
        23,
        0,
        93,
    )
    with pytest.raises(ReclaimRefused, match="reclaimed already"):
        await ledger.reclaim("acme", A)
    record = await ledger.instance("acme", A)
    assert record is not None
    assert record.retired == "reclaimed"
    # A reclaimed instance that comes back cannot return what was written off.
    late = await _returned(ledger, A, 23, 7)
    assert late.refused is not None
    assert late.credited == 0
    with pytest.raises(InstanceRetired):
        await ledger.record_grant("acme", A, 1)
    await ledger.integrity_check()


async def test_returns_and_reclaims_are_append_only_and_checked(
    ledger: Ledger, ledger_path: Path
) -> None:
    await ledger.supply("acme", 10)
    await ledger.record_grant("acme", A, 10)
    await _returned(ledger, A, 4, 0, final=False, recall_id=1)
    raw = sqlite3.connect(ledger_path)
    try:
        for statement in ("UPDATE returns SET returned_total = 9", "DELETE FROM returns"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                raw.execute(statement)
        raw.execute("UPDATE instance_totals SET returned = 9")
        raw.commit()
    finally:
        raw.close()
    with pytest.raises(LedgerStorageError, match="totals do not match"):
        await ledger.integrity_check()

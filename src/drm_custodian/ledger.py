"""The custodian's ledger: durable, append-only records from which every balance is derived.

Theory of operation
-------------------
The ledger backs invariants I1 (no over-issue), I4 (exact, monotone usage) and I6 (grants
are written ahead). Four tables only ever receive INSERTs (triggers refuse UPDATE and
DELETE), and every balance is derived from them.

* ``supplies``: operator top-ups; a retry with the same idempotency key counts once (D04).
* ``grants``: units lent to one enclave instance, with its new cumulative total (P4).
  :meth:`Ledger.record_grant`, :meth:`Ledger.grant_due` (the balance read and the grant
  in one transaction) and :meth:`Ledger.supply` (a top-up and the grants it makes due, in
  one transaction and one fsync) return only once the rows are durable, and the caller
  sends the grants after that (I6); a grant whose send fails stays charged (P2: a loan).
* ``usage``: an instance's cumulative served count. A row is written only when the count
  grows, so a duplicated, replayed or reordered report changes nothing. A count above the
  instance's grants is recorded (it *was* served) but flagged: I2 broke somewhere.
* ``blocks``: block/unblock history; the newest row wins.

Totals: a daemon that runs for months writes a usage row up to a hundred times a second,
so a balance summed over the records would cost more with every hour, and it is read on
every report (figures: docs/production.md, *Measurements behind the design*). Two small
tables hold the running totals instead: ``borrower_totals`` (supplied) and
``instance_totals`` (an instance's granted and served totals). Triggers on the record
tables keep them, inside the very transaction that inserts the record, so a crash cannot
leave a total half-updated, and no code path can forget them. A balance reads one row per
borrower and one per instance it ever had.
:meth:`Ledger.integrity_check` recomputes every total from the records and refuses a file
where one differs.

Schema versions: a file is brought to :data:`SCHEMA_VERSION` on open by one ordered path
of steps (:data:`_MIGRATIONS`), each from version ``n`` to ``n + 1``, in the same
transaction as the version bump, so an interrupted upgrade leaves the file as it was; a
new file is made by the same path from the records' layout, so a fresh file and an
upgraded one cannot differ. Version 2 added the totals; version 3 counts the requests
served beside the inferences (a request of ``k`` items is ``k`` inferences, one request:
the lending terms, I14); version 4 records units coming back: ``returns`` (an instance's
cumulative returned total, as the enclave confirmed it, I20, and whether it was its
final one: a clean stop) and ``reclaims`` (the owner's write-off of a dead instance's
units in doubt, I21), two more append-only tables, each never mistaken for the other.

Durability: WAL with ``synchronous=FULL``, so a returned COMMIT survives a process crash
and a power cut (WAL + ``NORMAL`` may lose the last commits on power loss). Each write is
one ``BEGIN IMMEDIATE`` transaction, so a grant's check-then-insert cannot interleave with
another writer, even in another process.

Threading: SQLite blocks (an fsync per commit), so calls run in ``trio.to_thread`` under a
``CapacityLimiter(1)`` on one connection. A connection has a single transaction state:
two threads using it at once would mix their statements into one transaction. The limiter
serialises whole transactions (FIFO), which also makes it safe to use the connection from
whichever cached worker thread trio picks. Calls are not abandoned on cancellation: a
cancelled caller waits for its transaction to end, so none runs on behind its back; one
cancelled just after a grant's COMMIT does not send it, and the grant stays charged (P2).
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

import structlog
import trio

from drm_wire.limits import MAX_GRANT_UNITS, MAX_UINT

from .ledger_records import (
    MAX_NAME_LEN,
    Balance,
    BorrowerBlocked,
    Grant,
    GrantRefused,
    IdempotencyConflict,
    InstanceRecord,
    InstanceRetired,
    InsufficientSupply,
    LedgerError,
    LedgerInputError,
    LedgerStorageError,
    ReclaimRefused,
    ReclaimResult,
    ReturnResult,
    SupplyResult,
    UsageReport,
    UsageResult,
    _check_int,
    _check_name,
)

__all__ = [
    "MAX_BATCH",
    "MAX_NAME_LEN",
    "MAX_REASON_LEN",
    "SCHEMA_VERSION",
    "Balance",
    "BorrowerBlocked",
    "Grant",
    "GrantPlan",
    "GrantRefused",
    "IdempotencyConflict",
    "InstanceRecord",
    "InstanceRetired",
    "InsufficientSupply",
    "Ledger",
    "LedgerError",
    "LedgerInputError",
    "LedgerStorageError",
    "ReclaimRefused",
    "ReclaimResult",
    "ReturnResult",
    "SupplyResult",
    "UsageReport",
    "UsageResult",
]

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

#: The units to grant an instance now, from the borrower's balance and the instance's
#: granted (less what it returned) and served totals (0 for none): a pure function the
#: ledger runs in its thread, inside the transaction that read those figures.
GrantPlan = Callable[[Balance, int, int], int]

#: Version of the table layout below; older files are upgraded on open along
#: :data:`_MIGRATIONS`, a newer or unknown version is refused, not guessed at.
SCHEMA_VERSION: Final = 4
#: Block reasons are operator prose; a paragraph is plenty.
MAX_REASON_LEN: Final = 1024
#: Usage reports in one batch transaction: bounds the time the single writer is held.
MAX_BATCH: Final = 10_000
#: How long a write waits for a lock held by another process (a CLI) before failing.
_BUSY_TIMEOUT: Final = 5.0

#: Version 1: the append-only records.
_RECORDS_SCHEMA: Final = [
    """CREATE TABLE supplies (id INTEGER PRIMARY KEY, borrower TEXT NOT NULL,
        units INTEGER NOT NULL CHECK (units > 0), idempotency_key TEXT UNIQUE, at REAL NOT NULL)""",
    """CREATE TABLE grants (grant_id INTEGER PRIMARY KEY, borrower TEXT NOT NULL,
        instance_id TEXT NOT NULL, units INTEGER NOT NULL CHECK (units > 0),
        cumulative INTEGER NOT NULL, at REAL NOT NULL)""",
    "CREATE INDEX grants_by_instance ON grants (borrower, instance_id, cumulative)",
    """CREATE TABLE usage (id INTEGER PRIMARY KEY, borrower TEXT NOT NULL,
        instance_id TEXT NOT NULL, served_total INTEGER NOT NULL, seq INTEGER NOT NULL,
        over_grant INTEGER NOT NULL, at REAL NOT NULL)""",
    "CREATE INDEX usage_by_instance ON usage (borrower, instance_id, served_total)",
    """CREATE TABLE blocks (id INTEGER PRIMARY KEY, borrower TEXT NOT NULL,
        blocked INTEGER NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL)""",
    "CREATE INDEX blocks_by_borrower ON blocks (borrower, id)",
] + [
    f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
    f"BEGIN SELECT RAISE(ABORT, 'ledger tables are append-only'); END"
    for table in ("supplies", "grants", "usage", "blocks")
    for op in ("UPDATE", "DELETE")
]

#: Version 2: running totals, kept by triggers in the inserting transaction (see above).
#: Grants and usage rows only ever raise an instance's totals (``cumulative`` and
#: ``served_total`` grow per instance), so MAX keeps a replayed row harmless.
_TOTALS_SCHEMA_V2: Final = [
    """CREATE TABLE borrower_totals (borrower TEXT PRIMARY KEY,
        supplied INTEGER NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE instance_totals (borrower TEXT NOT NULL, instance_id TEXT NOT NULL,
        granted INTEGER NOT NULL, served INTEGER NOT NULL,
        PRIMARY KEY (borrower, instance_id)) WITHOUT ROWID""",
    """CREATE TRIGGER supplies_total AFTER INSERT ON supplies BEGIN
        INSERT INTO borrower_totals VALUES (NEW.borrower, NEW.units)
        ON CONFLICT (borrower) DO UPDATE SET supplied = supplied + NEW.units; END""",
    """CREATE TRIGGER grants_total AFTER INSERT ON grants BEGIN
        INSERT INTO instance_totals VALUES (NEW.borrower, NEW.instance_id, NEW.cumulative, 0)
        ON CONFLICT (borrower, instance_id)
        DO UPDATE SET granted = MAX(granted, NEW.cumulative); END""",
    """CREATE TRIGGER usage_total AFTER INSERT ON usage BEGIN
        INSERT INTO instance_totals VALUES (NEW.borrower, NEW.instance_id, 0, NEW.served_total)
        ON CONFLICT (borrower, instance_id)
        DO UPDATE SET served = MAX(served, NEW.served_total); END""",
]

#: Version 3: the requests an instance's inferences were served in, beside them (a usage
#: row carries both cumulative counts); the totals' triggers name their columns.
_REQUESTS_SCHEMA_V3: Final = [
    "ALTER TABLE usage ADD COLUMN requests_total INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE instance_totals ADD COLUMN requests INTEGER NOT NULL DEFAULT 0",
    "DROP TRIGGER grants_total",
    "DROP TRIGGER usage_total",
    """CREATE TRIGGER grants_total AFTER INSERT ON grants BEGIN
        INSERT INTO instance_totals (borrower, instance_id, granted, served, requests)
        VALUES (NEW.borrower, NEW.instance_id, NEW.cumulative, 0, 0)
        ON CONFLICT (borrower, instance_id)
        DO UPDATE SET granted = MAX(granted, NEW.cumulative); END""",
    """CREATE TRIGGER usage_total AFTER INSERT ON usage BEGIN
        INSERT INTO instance_totals (borrower, instance_id, granted, served, requests)
        VALUES (NEW.borrower, NEW.instance_id, 0, NEW.served_total, NEW.requests_total)
        ON CONFLICT (borrower, instance_id)
        DO UPDATE SET served = MAX(served, NEW.served_total),
                      requests = MAX(requests, NEW.requests_total); END""",
]

#: Version 4: units coming back. ``returns``: an instance's cumulative returned total as
#: its enclave confirmed it (I20), and whether that return was final (a clean stop);
#: ``reclaims``: the owner's write-off of a dead instance's units in doubt (I21), at most
#: one per instance. Both append-only; the instance's totals gain ``returned``,
#: ``stopped`` and ``reclaimed``, kept by triggers like the others.
_RETURNS_SCHEMA_V4: Final = [
    """CREATE TABLE returns (id INTEGER PRIMARY KEY, borrower TEXT NOT NULL,
        instance_id TEXT NOT NULL, returned_total INTEGER NOT NULL CHECK (returned_total >= 0),
        final INTEGER NOT NULL CHECK (final IN (0, 1)), recall_id INTEGER, at REAL NOT NULL)""",
    "CREATE INDEX returns_by_instance ON returns (borrower, instance_id, returned_total)",
    """CREATE TABLE reclaims (id INTEGER PRIMARY KEY, borrower TEXT NOT NULL,
        instance_id TEXT NOT NULL, units INTEGER NOT NULL CHECK (units >= 0),
        at REAL NOT NULL, UNIQUE (borrower, instance_id))""",
    "ALTER TABLE instance_totals ADD COLUMN returned INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE instance_totals ADD COLUMN stopped INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE instance_totals ADD COLUMN reclaimed INTEGER NOT NULL DEFAULT 0",
    """CREATE TRIGGER returns_total AFTER INSERT ON returns BEGIN
        INSERT INTO instance_totals (borrower, instance_id, granted, served, requests,
            returned, stopped, reclaimed)
        VALUES (NEW.borrower, NEW.instance_id, 0, 0, 0, NEW.returned_total, NEW.final, 0)
        ON CONFLICT (borrower, instance_id)
        DO UPDATE SET returned = MAX(returned, NEW.returned_total),
                      stopped = MAX(stopped, NEW.final); END""",
    """CREATE TRIGGER reclaims_total AFTER INSERT ON reclaims BEGIN
        INSERT INTO instance_totals (borrower, instance_id, granted, served, requests,
            returned, stopped, reclaimed)
        VALUES (NEW.borrower, NEW.instance_id, 0, 0, 0, 0, 0, NEW.units)
        ON CONFLICT (borrower, instance_id)
        DO UPDATE SET reclaimed = reclaimed + NEW.units; END""",
] + [
    f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
    f"BEGIN SELECT RAISE(ABORT, 'ledger tables are append-only'); END"
    for table in ("returns", "reclaims")
    for op in ("UPDATE", "DELETE")
]

#: The totals as version 2 laid them out, from the records (the 1 -> 2 step fills them).
_TOTALS_FROM_RECORDS_V2: Final = {
    "borrower_totals": "SELECT borrower, SUM(units) FROM supplies GROUP BY borrower",
    "instance_totals": """SELECT borrower, instance_id, MAX(granted), MAX(served) FROM (
        SELECT borrower, instance_id, MAX(cumulative) AS granted, 0 AS served
            FROM grants GROUP BY borrower, instance_id
        UNION ALL
        SELECT borrower, instance_id, 0, MAX(served_total)
            FROM usage GROUP BY borrower, instance_id)
        GROUP BY borrower, instance_id""",
}
#: Each totals table as the records define it: what the triggers must agree with.
_TOTALS_FROM_RECORDS: Final = {
    "borrower_totals": "SELECT borrower, SUM(units) FROM supplies GROUP BY borrower",
    "instance_totals": """SELECT borrower, instance_id, MAX(granted), MAX(served),
        MAX(requests), MAX(returned), MAX(stopped), SUM(reclaimed) FROM (
        SELECT borrower, instance_id, MAX(cumulative) AS granted, 0 AS served, 0 AS requests,
            0 AS returned, 0 AS stopped, 0 AS reclaimed
            FROM grants GROUP BY borrower, instance_id
        UNION ALL
        SELECT borrower, instance_id, 0, MAX(served_total), MAX(requests_total), 0, 0, 0
            FROM usage GROUP BY borrower, instance_id
        UNION ALL
        SELECT borrower, instance_id, 0, 0, 0, MAX(returned_total), MAX(final), 0
            FROM returns GROUP BY borrower, instance_id
        UNION ALL
        SELECT borrower, instance_id, 0, 0, 0, 0, 0, SUM(units)
            FROM reclaims GROUP BY borrower, instance_id)
        GROUP BY borrower, instance_id""",
}
#: Rows on one side only, both ways: the stored totals that the records do not give, and
#: the totals the records give that are not stored.
_TOTALS_DIFFER: Final = {
    table: (
        f"SELECT 'stored', * FROM (SELECT * FROM {table} EXCEPT {records}) UNION ALL "  # noqa: S608 (constants)
        f"SELECT 'due', * FROM ({records} EXCEPT SELECT * FROM {table}) LIMIT 5"
    )
    for table, records in _TOTALS_FROM_RECORDS.items()
}
#: Granted is both the sum of the grants' units and the newest ``cumulative``.
_GRANT_UNITS_MISMATCH: Final = """SELECT borrower, instance_id FROM grants
    GROUP BY borrower, instance_id HAVING SUM(units) != MAX(cumulative) LIMIT 5"""

# An instance's totals (0 and 0 for an instance never seen: the aggregate over no row).
_SERVED_AND_GRANTED = """SELECT COALESCE(MAX(served), 0), COALESCE(MAX(granted), 0)
    FROM instance_totals WHERE borrower=? AND instance_id=?"""
# Supplied, granted, served (sum over instances), in doubt (sum over instances of granted -
# served - returned - reclaimed, never negative), blocked, requests, returned, reclaimed:
# one statement, one snapshot, read from the totals.
_BALANCE: Final = """SELECT
    COALESCE((SELECT supplied FROM borrower_totals WHERE borrower=:b), 0),
    COALESCE(SUM(granted), 0), COALESCE(SUM(served), 0),
    COALESCE(SUM(MAX(granted - served - returned - reclaimed, 0)), 0),
    (SELECT blocked FROM blocks WHERE borrower=:b ORDER BY id DESC LIMIT 1),
    COALESCE(SUM(requests), 0), COALESCE(SUM(returned), 0), COALESCE(SUM(reclaimed), 0)
    FROM instance_totals WHERE borrower=:b"""
# One instance, all its totals (no row: never seen).
_INSTANCE: Final = """SELECT instance_id, granted, served, requests, returned, reclaimed, stopped,
    EXISTS (SELECT 1 FROM reclaims r WHERE r.borrower=t.borrower AND r.instance_id=t.instance_id)
    FROM instance_totals t WHERE borrower=? AND instance_id=?"""
_INSTANCES: Final = """SELECT instance_id, granted, served, requests, returned, reclaimed, stopped,
    EXISTS (SELECT 1 FROM reclaims r WHERE r.borrower=t.borrower AND r.instance_id=t.instance_id)
    FROM instance_totals t WHERE borrower=? ORDER BY instance_id"""
#: The same, the instance granted to most recently first (its latest grant's id; one
#: that was never granted anything last), then by id.
_INSTANCES_NEWEST_FIRST: Final = _INSTANCES.replace(
    "ORDER BY instance_id",
    "ORDER BY COALESCE((SELECT MAX(g.grant_id) FROM grants g WHERE g.borrower=t.borrower "
    "AND g.instance_id=t.instance_id), 0) DESC, instance_id",
)


#: The totals' triggers use UPSERT (``INSERT ... ON CONFLICT DO UPDATE``), new in 3.24.
MIN_SQLITE: Final = (3, 24, 0)


def _connect(path: str) -> sqlite3.Connection:
    """Open the database, enforce WAL + FULL, and create or check the schema."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        need = ".".join(map(str, MIN_SQLITE))
        raise LedgerStorageError(f"SQLite {sqlite3.sqlite_version} is too old: needs {need}+")
    # isolation_level=None: the module issues no implicit BEGIN; we write our own.
    conn = sqlite3.connect(
        path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
    )
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":  # e.g. ":memory:" answers "memory"
            raise LedgerStorageError(f"journal_mode is {mode!r}, not 'wal'")
        conn.execute("PRAGMA synchronous=FULL")
        if conn.execute("PRAGMA synchronous").fetchone()[0] != 2:
            raise LedgerStorageError("synchronous=FULL was not applied")
        _transaction(conn, _ensure_schema)
    except BaseException:
        conn.close()
        raise
    return conn


def _ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the file along the migration path, or bring it to :data:`SCHEMA_VERSION`
    (inside the caller's transaction: all steps and the version bump, or nothing)."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    if row is None:
        for statement in _RECORDS_SCHEMA:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1)")
        version = 1
    else:
        version = row[0]
        if type(version) is not int or not 1 <= version <= SCHEMA_VERSION:
            raise LedgerStorageError(
                f"ledger schema version {version}, expected {SCHEMA_VERSION} or older"
            )
    start = version
    for step in _MIGRATIONS[version - 1 :]:
        step(conn)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
    if row is not None and start != SCHEMA_VERSION:
        log.info("ledger_upgraded", from_version=start, to_version=SCHEMA_VERSION)


def _add_totals(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2: create the totals and fill them from the records."""
    for statement in _TOTALS_SCHEMA_V2:
        conn.execute(statement)
    for table, query in _TOTALS_FROM_RECORDS_V2.items():
        conn.execute(f"INSERT INTO {table} {query}")


def _add_requests(conn: sqlite3.Connection) -> None:
    """Version 2 -> 3: count requests beside inferences. Under version 2 one request cost
    one unit whatever it held, so each usage row's requests are its inferences: the new
    column is set so (the one write to a record ever, with the append-only trigger lifted
    for it inside this transaction), and the totals follow from the records."""
    for statement in _REQUESTS_SCHEMA_V3:
        conn.execute(statement)
    conn.execute("DROP TRIGGER usage_no_update")
    conn.execute("UPDATE usage SET requests_total = served_total")
    conn.execute(
        "CREATE TRIGGER usage_no_update BEFORE UPDATE ON usage "
        "BEGIN SELECT RAISE(ABORT, 'ledger tables are append-only'); END"
    )
    conn.execute("UPDATE instance_totals SET requests = served")


def _add_returns(conn: sqlite3.Connection) -> None:
    """Version 3 -> 4: the returns and reclaims tables, and their totals. Nothing came
    back before version 4, so every instance starts with 0 returned and 0 reclaimed (the
    new columns' default), live, not stopped."""
    for statement in _RETURNS_SCHEMA_V4:
        conn.execute(statement)


#: The ordered migration path: ``_MIGRATIONS[n - 1]`` takes version ``n`` to ``n + 1``.
#: A later change of the layout appends its step here and bumps :data:`SCHEMA_VERSION`.
_MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (
    _add_totals,
    _add_requests,
    _add_returns,
)
assert len(_MIGRATIONS) == SCHEMA_VERSION - 1


def _totals_mismatch(conn: sqlite3.Connection) -> list[str]:
    """Where the stored totals differ from the records (empty when they agree)."""
    problems = [
        f"grants of {borrower}/{instance} do not add up to their cumulative total"
        for borrower, instance in conn.execute(_GRANT_UNITS_MISMATCH)
    ]
    for table, query in _TOTALS_DIFFER.items():
        problems += [f"{table}: {row[0]} {row[1:]!r}" for row in conn.execute(query)]
    return problems


def _transaction(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], _T]) -> _T:
    """Run ``body`` in one write transaction; roll back on any failure, then re-raise."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _read_snapshot(conn: sqlite3.Connection, body: Callable[[], _T]) -> _T:
    """Run ``body``'s reads in one read transaction: in WAL mode every statement in it
    sees the database as of its first read, whatever other connections commit meanwhile."""
    conn.execute("BEGIN DEFERRED")
    try:
        return body()
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


class Ledger:
    """The durable ledger: build it with :meth:`open`; share it between tasks freely."""

    def __init__(
        self, conn: sqlite3.Connection, limiter: trio.CapacityLimiter, clock: Callable[[], float]
    ) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._limiter = limiter
        self._clock = clock

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> Ledger:
        """Open (creating if needed) the ledger at ``path``.

        Args:
            path: the SQLite file. Its directory must allow the ``-wal``/``-shm`` side files.
            clock: wall clock for the ``at`` audit column (tests pin it).

        Raises:
            LedgerStorageError: the file is unusable, not WAL-capable, or of another schema.
        """
        limiter = trio.CapacityLimiter(1)
        try:
            conn = await trio.to_thread.run_sync(_connect, os.fspath(path), limiter=limiter)
        except sqlite3.Error as exc:
            raise LedgerStorageError(f"cannot open ledger: {exc}") from exc
        return cls(conn, limiter, clock)

    def __repr__(self) -> str:
        return f"<Ledger {'closed' if self._conn is None else 'open'}>"

    async def _run(self, body: Callable[[sqlite3.Connection], _T], *, write: bool = True) -> _T:
        def run() -> _T:
            if self._conn is None:
                raise trio.ClosedResourceError("the ledger is closed")
            # A lone SELECT is its own consistent snapshot: no write lock needed.
            return _transaction(self._conn, body) if write else body(self._conn)

        try:
            return await trio.to_thread.run_sync(run, limiter=self._limiter)
        except sqlite3.Error as exc:  # the one place SQLite's errors are translated
            raise LedgerStorageError(f"ledger call failed: {exc}") from exc

    async def supply(
        self,
        borrower: str,
        units: int,
        *,
        idempotency_key: str | None = None,
        grant_to: Sequence[tuple[str, GrantPlan]] = (),
    ) -> SupplyResult:
        """Record an operator top-up (also for a blocked borrower: blocking stops grants),
        and in the same transaction the grants it makes due to the instances in
        ``grant_to`` (instance id, plan), each planned against the balance left by the
        ones before it.

        The admin API names the linked instances: a parked request then waits for one
        durable commit (one fsync) instead of two, the supply's and then its link's grant.

        Raises:
            LedgerInputError: bad borrower, units, key or instance id, or a plan asked for
                units out of range.
            IdempotencyConflict: the key was already used for a different supply.
            InsufficientSupply: a plan asked for more than the balance it was shown.
        """
        _check_name(borrower, "borrower")
        _check_int(units, "units", low=1, high=MAX_GRANT_UNITS)
        if idempotency_key is not None:
            _check_name(idempotency_key, "idempotency_key")
        for instance_id, _ in grant_to:
            _check_name(instance_id, "instance_id")
        at = self._clock()

        def body(conn: sqlite3.Connection) -> SupplyResult:
            row = None
            if idempotency_key is not None:
                row = conn.execute(
                    "SELECT id, borrower, units, at FROM supplies WHERE idempotency_key=?",
                    (idempotency_key,),
                ).fetchone()
                if row is not None and (row[1], row[2]) != (borrower, units):
                    raise IdempotencyConflict("idempotency key reused for a different supply")
            replayed = row is not None
            if row is None:
                cur = conn.execute(
                    "INSERT INTO supplies (borrower, units, idempotency_key, at) "
                    "VALUES (?, ?, ?, ?)",
                    (borrower, units, idempotency_key, at),
                )
                assert cur.lastrowid is not None
                row = (cur.lastrowid, borrower, units, at)
            grants = []
            for instance_id, plan in grant_to:
                _, grant = _grant_planned(conn, borrower, instance_id, plan, at)
                if grant is not None:
                    grants.append(grant)
            return SupplyResult(
                row[0],
                borrower,
                units,
                idempotency_key,
                row[3],
                _balance(conn, borrower),
                replayed=replayed,
                grants=tuple(grants),
            )

        return await self._run(body)

    async def record_grant(self, borrower: str, instance_id: str, units: int) -> Grant:
        """Durably commit a grant; send it to the instance only after this returns (I6).

        Raises:
            LedgerInputError: bad borrower, instance id or units.
            BorrowerBlocked: the borrower is blocked.
            InsufficientSupply: ``units`` exceeds the remaining supply.
        """
        _check_name(borrower, "borrower")
        _check_name(instance_id, "instance_id")
        _check_int(units, "units", low=1, high=MAX_GRANT_UNITS)
        at = self._clock()
        return await self._run(
            lambda conn: _insert_grant(
                conn, borrower, _balance(conn, borrower), instance_id, units, at
            )
        )

    async def grant_due(
        self, borrower: str, instance_id: str, plan: GrantPlan
    ) -> tuple[Balance, Grant | None]:
        """Read the balance and commit the grant ``plan`` asks for, in one transaction.

        What a link does whenever something changed: one trip to the ledger thread instead
        of a balance read and then :meth:`record_grant` (each trip waits for the event
        loop, which an admin call's HTTP answer keeps busy), and no window between the two
        in which another writer could change the balance. ``plan`` (see :data:`GrantPlan`)
        sees the balance and the instance's totals as this transaction reads them.
        Nothing is granted to a blocked borrower.

        Returns:
            The balance before the grant, and the durable grant (send it now, I6) or
            ``None``.

        Raises:
            LedgerInputError: bad borrower or instance id, or ``plan`` asked for units
                out of range.
            InsufficientSupply: ``plan`` asked for more than the balance it was shown.
        """
        _check_name(borrower, "borrower")
        _check_name(instance_id, "instance_id")
        at = self._clock()

        return await self._run(lambda conn: _grant_planned(conn, borrower, instance_id, plan, at))

    async def record_usage(
        self,
        borrower: str,
        instance_id: str,
        served_total: int,
        seq: int,
        *,
        requests_total: int = 0,
    ) -> UsageResult:
        """Record an instance's cumulative served count (and the requests it was served
        in); idempotent under replay and reorder.

        Raises:
            LedgerInputError: bad borrower, instance id, count or sequence number.
        """
        report = UsageReport(
            borrower=borrower,
            instance_id=instance_id,
            served_total=served_total,
            seq=seq,
            requests_total=requests_total,
        )
        return (await self.record_usage_batch([report]))[0]

    async def record_usage_batch(self, reports: Sequence[UsageReport]) -> list[UsageResult]:
        """Record many reports in one transaction (one fsync): the fast ingest path.

        Reports are applied in order, so two for one instance behave as two calls would.

        Raises:
            LedgerInputError: more than :data:`MAX_BATCH` reports, or one is not a UsageReport.
        """
        if len(reports) > MAX_BATCH:
            raise LedgerInputError(
                f"at most {MAX_BATCH} reports", field="reports", got=len(reports)
            )
        for report in reports:
            if type(report) is not UsageReport:
                raise LedgerInputError(
                    "must be UsageReport", field="reports", got=type(report).__name__
                )
        at = self._clock()

        def body(conn: sqlite3.Connection) -> list[UsageResult]:
            applied = [_apply_usage(conn, report, at) for report in reports]
            balances = {borrower: _balance(conn, borrower) for borrower, *_ in applied}
            return [UsageResult(*fields, balances[fields[0]]) for fields in applied]

        results = await self._run(body)
        for result in results:
            if result.over_grant and result.advanced:
                # I2 is broken somewhere: the instance served more than it was lent.
                log.error("usage_over_grant", **dataclasses.asdict(result))
        return results

    async def set_blocked(self, borrower: str, blocked: bool, reason: str) -> None:
        """Block or unblock a borrower; a blocked borrower gets no new grant.

        Raises:
            LedgerInputError: bad borrower or reason, or ``blocked`` not a bool.
        """
        _check_name(borrower, "borrower")
        _check_name(reason, "reason", max_len=MAX_REASON_LEN, empty=True)
        if type(blocked) is not bool:
            raise LedgerInputError("must be a bool", field="blocked", got=type(blocked).__name__)
        at = self._clock()

        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO blocks (borrower, blocked, reason, at) VALUES (?, ?, ?, ?)",
                (borrower, int(blocked), reason, at),
            )

        await self._run(body)

    async def balance(self, borrower: str) -> Balance:
        """The borrower's balance, from one SQL statement (a consistent snapshot)."""
        _check_name(borrower, "borrower")
        return await self._run(lambda conn: _balance(conn, borrower), write=False)

    async def last_grant(self, borrower: str, instance_id: str) -> Grant | None:
        """The instance's newest grant record (its ``cumulative`` is the instance's
        granted total), or ``None`` if it was never granted anything: what a new link
        re-sends so the enclave catches up (docs/links.md, step 4)."""
        _check_name(borrower, "borrower")
        _check_name(instance_id, "instance_id")

        def body(conn: sqlite3.Connection) -> Grant | None:
            row = conn.execute(
                "SELECT grant_id, borrower, instance_id, units, cumulative, at FROM grants "
                "WHERE borrower=? AND instance_id=? ORDER BY cumulative DESC LIMIT 1",
                (borrower, instance_id),
            ).fetchone()
            return None if row is None else Grant(*row)

        return await self._run(body, write=False)

    async def served_total(self, borrower: str, instance_id: str) -> int:
        """The instance's recorded served total (0 if it never reported)."""
        _check_name(borrower, "borrower")
        _check_name(instance_id, "instance_id")

        def body(conn: sqlite3.Connection) -> int:
            row = conn.execute(_SERVED_AND_GRANTED, (borrower, instance_id)).fetchone()
            return int(row[0])

        return await self._run(body, write=False)

    async def record_return(
        self,
        borrower: str,
        instance_id: str,
        *,
        returned_total: int,
        served_total: int,
        requests_total: int,
        final: bool,
        recall_id: int | None = None,
    ) -> ReturnResult:
        """Record an instance's return (I20): its served total first (as a usage report
        with ``seq`` 0), then the return, in one transaction.

        The return is credited only if it does not go back and
        ``served + returned_total <= granted`` holds for the instance (``served`` as now
        recorded). Otherwise it is refused: nothing of it is written, the served total
        stands, and :attr:`ReturnResult.refused` says why. A total equal to the recorded
        one credits nothing (a replay) but may still mark the instance stopped when final.

        Raises:
            LedgerInputError: bad borrower, instance id, totals or recall id.
        """
        report = UsageReport(
            borrower=borrower,
            instance_id=instance_id,
            served_total=served_total,
            seq=0,
            requests_total=requests_total,
        )
        _check_int(returned_total, "returned_total", low=0, high=MAX_UINT)
        if type(final) is not bool:
            raise LedgerInputError("must be a bool", field="final", got=type(final).__name__)
        if recall_id is not None:
            _check_int(recall_id, "recall_id", low=0, high=MAX_UINT)
        at = self._clock()

        def body(conn: sqlite3.Connection) -> ReturnResult:
            _, _, served, granted, _, _ = _apply_usage(conn, report, at)
            record = _instance(conn, borrower, instance_id)
            recorded = 0 if record is None else record.returned
            refused = None
            if returned_total < recorded:
                refused = f"returned_total {returned_total} is below the recorded {recorded}"
            elif served + returned_total > granted:
                refused = (
                    f"returning {returned_total} with {served} served exceeds the {granted} granted"
                )
            elif record is not None and record.was_reclaimed:
                refused = "the owner wrote this instance off"
            credited = 0
            if refused is None:
                stopped = record is not None and record.stopped
                if returned_total > recorded or (final and not stopped):
                    conn.execute(
                        "INSERT INTO returns (borrower, instance_id, returned_total, final, "
                        "recall_id, at) VALUES (?, ?, ?, ?, ?, ?)",
                        (borrower, instance_id, returned_total, int(final), recall_id, at),
                    )
                credited = returned_total - recorded
                recorded = returned_total
            return ReturnResult(
                recorded, credited, served, granted, refused, _balance(conn, borrower)
            )

        return await self._run(body)

    async def reclaim(self, borrower: str, instance_id: str) -> ReclaimResult:
        """Write off what the instance holds in doubt, as the owner's decision (I21).

        The caller (the admin API) checks the instance is not live and the time since
        anything was sent to it; the ledger records the write-off (even of 0 units: the
        record retires the instance id) at most once per instance.

        Raises:
            LedgerInputError: bad borrower or instance id.
            ReclaimRefused: the ledger never saw this instance, or it was reclaimed already.
        """
        _check_name(borrower, "borrower")
        _check_name(instance_id, "instance_id")
        at = self._clock()

        def body(conn: sqlite3.Connection) -> ReclaimResult:
            record = _instance(conn, borrower, instance_id)
            if record is None:
                raise ReclaimRefused(f"no instance {instance_id} of {borrower} in the ledger")
            if record.was_reclaimed:
                raise ReclaimRefused(f"instance {instance_id} was reclaimed already")
            units = record.in_doubt
            conn.execute(
                "INSERT INTO reclaims (borrower, instance_id, units, at) VALUES (?, ?, ?, ?)",
                (borrower, instance_id, units, at),
            )
            return ReclaimResult(instance_id, units, _balance(conn, borrower))

        return await self._run(body)

    async def instance(self, borrower: str, instance_id: str) -> InstanceRecord | None:
        """One instance's totals, or ``None`` if the ledger never saw it."""
        _check_name(borrower, "borrower")
        _check_name(instance_id, "instance_id")
        return await self._run(lambda conn: _instance(conn, borrower, instance_id), write=False)

    async def instances(self, borrower: str, *, newest_first: bool = False) -> list[InstanceRecord]:
        """Every instance the borrower ever had, by id (or, with ``newest_first``, the one
        granted to most recently first)."""
        _check_name(borrower, "borrower")
        query = _INSTANCES_NEWEST_FIRST if newest_first else _INSTANCES
        return await self._run(
            lambda conn: [_instance_record(row) for row in conn.execute(query, (borrower,))],
            write=False,
        )

    async def usage(
        self, borrower: str, *, newest_first: bool = False
    ) -> tuple[Balance, list[InstanceRecord]]:
        """The borrower's balance and every instance's totals from one read transaction:
        a grant or a report committed meanwhile is in both or in neither, so the rows add
        up to the totals (``GET /usage``)."""
        _check_name(borrower, "borrower")
        query = _INSTANCES_NEWEST_FIRST if newest_first else _INSTANCES

        def body(conn: sqlite3.Connection) -> tuple[Balance, list[InstanceRecord]]:
            return _read_snapshot(
                conn,
                lambda: (
                    _balance(conn, borrower),
                    [_instance_record(row) for row in conn.execute(query, (borrower,))],
                ),
            )

        return await self._run(body, write=False)

    async def integrity_check(self) -> None:
        """Run SQLite's ``PRAGMA integrity_check`` (after a crash, before serving).

        Raises:
            LedgerStorageError: the database file is damaged.
        """
        rows = await self._run(
            lambda conn: conn.execute("PRAGMA integrity_check").fetchall(), write=False
        )
        if rows != [("ok",)]:
            raise LedgerStorageError(f"integrity_check failed: {rows[:5]!r}")
        problems = await self._run(_totals_mismatch, write=False)
        if problems:
            raise LedgerStorageError(f"ledger totals do not match its records: {problems[:5]}")

    async def aclose(self) -> None:
        """Close the connection (after any call in progress); later calls raise
        ``trio.ClosedResourceError``. Closing twice is allowed."""

        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await trio.to_thread.run_sync(close, limiter=self._limiter)


def _apply_usage(
    conn: sqlite3.Connection, report: UsageReport, at: float
) -> tuple[str, str, int, int, bool, bool]:
    """Insert the report if it advances the count: a :class:`UsageResult`, less the balance."""
    key = (report.borrower, report.instance_id)
    current, granted = conn.execute(_SERVED_AND_GRANTED, key).fetchone()
    advanced = report.served_total > current
    if advanced:
        current = report.served_total
        conn.execute(
            "INSERT INTO usage (borrower, instance_id, served_total, requests_total, seq, "
            "over_grant, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*key, current, report.requests_total, report.seq, int(current > granted), at),
        )
    return (*key, current, granted, advanced, current > granted)


def _balance(conn: sqlite3.Connection, borrower: str) -> Balance:
    supplied, granted, served, in_doubt, blocked, requests, returned, reclaimed = conn.execute(
        _BALANCE, {"b": borrower}
    ).fetchone()
    # Units returned (I20) or written off (I21) may be granted again.
    remaining = supplied - granted + returned + reclaimed
    return Balance(
        supplied, granted, served, in_doubt, remaining, bool(blocked), requests, returned, reclaimed
    )


def _instance(conn: sqlite3.Connection, borrower: str, instance_id: str) -> InstanceRecord | None:
    row = conn.execute(_INSTANCE, (borrower, instance_id)).fetchone()
    return None if row is None else _instance_record(row)


def _instance_record(row: tuple[object, ...]) -> InstanceRecord:
    instance_id, granted, served, requests, returned, reclaimed, stopped, was_reclaimed = row
    return InstanceRecord(
        instance_id,  # type: ignore[arg-type]
        granted,  # type: ignore[arg-type]
        served,  # type: ignore[arg-type]
        requests,  # type: ignore[arg-type]
        returned,  # type: ignore[arg-type]
        reclaimed,  # type: ignore[arg-type]
        bool(stopped),
        bool(was_reclaimed),
    )


def _grant_planned(
    conn: sqlite3.Connection, borrower: str, instance_id: str, plan: GrantPlan, at: float
) -> tuple[Balance, Grant | None]:
    """The balance, and the grant ``plan`` asks for given it and the instance's totals."""
    balance = _balance(conn, borrower)
    if balance.blocked:
        return balance, None
    record = _instance(conn, borrower, instance_id)
    if record is not None and record.retired is not None:
        return balance, None  # stopped or reclaimed: nothing more, and the supply stands
    served, granted = conn.execute(_SERVED_AND_GRANTED, (borrower, instance_id)).fetchone()
    # Units it gave back (a recall's answer, I20) are no longer held: plan without them.
    units = plan(balance, granted - (record.returned if record is not None else 0), served)
    if units == 0:
        return balance, None
    _check_int(units, "units", low=1, high=MAX_GRANT_UNITS)
    return balance, _insert_grant(conn, borrower, balance, instance_id, units, at)


def _insert_grant(
    conn: sqlite3.Connection,
    borrower: str,
    balance: Balance,
    instance_id: str,
    units: int,
    at: float,
) -> Grant:
    """Insert a grant of ``units`` against ``balance`` (read in this same transaction)."""
    remaining = balance.remaining
    if balance.blocked:
        raise BorrowerBlocked("borrower is blocked", borrower=borrower, remaining=remaining)
    record = _instance(conn, borrower, instance_id)
    if record is not None and record.retired is not None:
        msg = f"instance {instance_id} is {record.retired}: it gets nothing more"
        raise InstanceRetired(msg, borrower=borrower, remaining=remaining)
    if units > remaining:
        msg = f"{units} units asked, {remaining} remaining"
        raise InsufficientSupply(msg, borrower=borrower, remaining=remaining)
    cumulative = conn.execute(_SERVED_AND_GRANTED, (borrower, instance_id)).fetchone()[1] + units
    cur = conn.execute(
        "INSERT INTO grants (borrower, instance_id, units, cumulative, at) VALUES (?, ?, ?, ?, ?)",
        (borrower, instance_id, units, cumulative, at),
    )
    assert cur.lastrowid is not None
    return Grant(cur.lastrowid, borrower, instance_id, units, cumulative, at)

"""SQLite state: rate-limit counters, the claim journal and the result outbox.

Each database has one connection used from worker threads, one call at a time
(`trio.CapacityLimiter(1)`), WAL mode. Related statements go in one call and one
transaction. The schema version lives in `PRAGMA user_version` and migrates forward on
open; a file that cannot be opened or is corrupt raises `StoreError` (never a silent reset).

The journal holds task texts: every state file (the database and its `-wal`, `-shm` and
`-journal` companions, which SQLite creates with the database's mode) is 0600, also when an
older release left it 0644, and a state directory created here is 0700.
"""

from __future__ import annotations

import os
import sqlite3
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import orjson
import trio

T = TypeVar("T")


class StoreError(Exception):
    """The state store is unusable (cannot open, corrupt, read-only, disk full)."""


STATE_FILE_MODE = 0o600
STATE_DIR_MODE = 0o700


def secure_state_file(path: Path) -> None:
    """Create `path`'s directory (0700) if missing, the file itself 0600, and take group and
    other access from the file and its SQLite companions if an older release left them."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=STATE_DIR_MODE, exist_ok=True)
        os.chmod(parent, STATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    fd = os.open(path, os.O_RDWR | os.O_CREAT, STATE_FILE_MODE)
    os.close(fd)
    for p in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))):
        try:
            mode = os.stat(p).st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(p, mode & 0o700)


class SqliteDb:
    def __init__(self, path: str, migrations: Sequence[str], *, synchronous: str = "NORMAL") -> None:
        self.path = path
        self._limiter = trio.CapacityLimiter(1)
        self.writable = True
        self.last_error: str | None = None
        try:
            if path != ":memory:":
                secure_state_file(Path(path))
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={synchronous}")
            self._migrate(migrations)
            self._conn.execute("PRAGMA quick_check").fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open state store {path}: {exc}") from None

    def _migrate(self, migrations: Sequence[str]) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(migrations):
            raise StoreError(
                f"state store {self.path} has schema version {version}, newer than this release "
                f"understands ({len(migrations)}); run a newer processor or move the file away"
            )
        for i in range(version, len(migrations)):
            self._conn.execute("BEGIN IMMEDIATE")
            for statement in filter(None, (s.strip() for s in migrations[i].split(";"))):
                self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version={i + 1}")
            self._conn.execute("COMMIT")

    def tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one transaction (blocking; for start-up and tools)."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self.writable = False
            self.last_error = f"{self.path}: {exc}"
            raise StoreError(f"state store {self.path}: {exc}") from None
        self.writable = True
        self.last_error = None
        return out

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`tx(fn)` on a worker thread; not cancellable mid-transaction."""
        return await trio.to_thread.run_sync(self.tx, fn, limiter=self._limiter)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: {exc}") from None

    def close(self) -> None:
        self._conn.close()


# --- rate limits: `processor.effects.limiter.RateLimitStore` (on `SqliteDb`) ----------------


# --- journal and outbox ------------------------------------------------------------------

JOURNAL_MIGRATIONS = [
    """
    CREATE TABLE journal (task_id TEXT PRIMARY KEY, text TEXT NOT NULL, model TEXT NOT NULL,
                          backend TEXT NOT NULL, created_at REAL, claimed_at REAL NOT NULL,
                          reserved_at REAL, attempts INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE outbox (task_id TEXT PRIMARY KEY, state TEXT NOT NULL, vector BLOB,
                         reason TEXT, computed_at REAL NOT NULL, created_at REAL)
    """,
    # 2: task kinds (type, kind parameters, JSON results), "reached a backend" (rows written
    # before this version may have: they count as dispatched), persisted attempt counts.
    """
    ALTER TABLE journal ADD COLUMN dispatched INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE journal ADD COLUMN type TEXT NOT NULL DEFAULT 'text_embedding';
    ALTER TABLE journal ADD COLUMN params BLOB;
    ALTER TABLE outbox ADD COLUMN result_json BLOB;
    CREATE TABLE attempts (task_id TEXT PRIMARY KEY, count INTEGER NOT NULL, updated_at REAL NOT NULL)
    """,
]
ATTEMPTS_TTL = 30 * 86400.0  # attempt counts of tasks not seen for this long are forgotten


@attrs.frozen
class ClaimRow:
    task_id: str
    text: str
    model: str
    backend: str
    created_at: float | None
    claimed_at: float
    reserved_at: float | None
    attempts: int = 0
    dispatched: bool = False
    type: str = "text_embedding"


@attrs.frozen
class OutboxRow:
    task_id: str
    state: str  # "succeeded" | "failed"
    result: Any  # a vector (list of floats) or any JSON value
    reason: str | None
    computed_at: float
    created_at: float | None = None

    @property
    def vector(self) -> list[float] | None:
        return self.result if isinstance(self.result, list) else None


def _is_vector(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(type(x) is float for x in v)


def pack_vector(v: list[float] | None) -> bytes | None:
    return None if v is None else array("d", v).tobytes()


def unpack_vector(b: bytes | None) -> list[float] | None:
    if b is None:
        return None
    a = array("d")
    a.frombytes(b)
    return a.tolist()


class JournalStore:
    """Claims (journal) and computed results (outbox), under STATE_DIR."""

    def __init__(self, path: str) -> None:
        self.db = SqliteDb(path, JOURNAL_MIGRATIONS)

    async def add_claims(self, rows: Sequence[ClaimRow]) -> None:
        data = [(r.task_id, r.text, r.model, r.backend, r.created_at, r.claimed_at, r.reserved_at, r.attempts,
                 int(r.dispatched), r.type) for r in rows]
        await self.db.run(lambda c: c.executemany(
            "INSERT OR REPLACE INTO journal (task_id, text, model, backend, created_at, claimed_at, reserved_at, attempts,"
            " dispatched, type) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", data))

    async def mark_dispatched(self, task_ids: Sequence[str]) -> None:
        ids = [(i,) for i in task_ids]
        await self.db.run(lambda c: c.executemany("UPDATE journal SET dispatched = 1 WHERE task_id = ?", ids))

    async def count_attempts(self, task_ids: Sequence[str], now: float) -> None:
        """One more failed attempt for each task (kept across releases and restarts)."""
        ids = [(i, now) for i in task_ids]

        def fn(c: sqlite3.Connection) -> None:
            c.executemany("INSERT INTO attempts VALUES (?, 1, ?) ON CONFLICT(task_id) DO UPDATE SET count = count + 1,"
                          " updated_at = excluded.updated_at", ids)
            c.execute("DELETE FROM attempts WHERE updated_at < ?", (now - ATTEMPTS_TTL,))

        await self.db.run(fn)

    async def clear_attempts(self, task_ids: Sequence[str]) -> None:
        ids = [(i,) for i in task_ids]
        await self.db.run(lambda c: c.executemany("DELETE FROM attempts WHERE task_id = ?", ids))

    def attempts(self, task_ids: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(0, len(task_ids), 500):
            chunk = list(task_ids[i : i + 500])
            marks = ",".join("?" * len(chunk))
            for tid, n in self.db.query(f"SELECT task_id, count FROM attempts WHERE task_id IN ({marks})", chunk):
                out[tid] = int(n)
        return out

    async def remove_claims(self, task_ids: Sequence[str]) -> None:
        ids = [(i,) for i in task_ids]
        await self.db.run(lambda c: c.executemany("DELETE FROM journal WHERE task_id = ? AND task_id NOT IN (SELECT task_id FROM outbox)", ids))

    async def put_results(self, rows: Sequence[OutboxRow]) -> None:
        data = [
            (r.task_id, r.state, pack_vector(r.result) if _is_vector(r.result) else None, r.reason, r.computed_at,
             r.created_at, None if r.result is None or _is_vector(r.result) else orjson.dumps(r.result))
            for r in rows
        ]
        await self.db.run(lambda c: c.executemany(
            "INSERT OR REPLACE INTO outbox (task_id, state, vector, reason, computed_at, created_at, result_json)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", data))

    async def finish(self, task_ids: Sequence[str], *, attempts: bool = False) -> None:
        """Drop the tasks' outbox and journal rows together (and their attempt counts, when
        their story is over: reported), in one transaction."""
        ids = [(i,) for i in task_ids]

        def fn(c: sqlite3.Connection) -> None:
            c.executemany("DELETE FROM outbox WHERE task_id = ?", ids)
            c.executemany("DELETE FROM journal WHERE task_id = ?", ids)
            if attempts:
                c.executemany("DELETE FROM attempts WHERE task_id = ?", ids)

        await self.db.run(fn)

    def outbox(self) -> list[OutboxRow]:
        rows = self.db.query(
            "SELECT task_id, state, vector, reason, computed_at, created_at, result_json FROM outbox ORDER BY computed_at")
        out = []
        for t, s, v, r, ca, cr, rj in rows:
            try:
                result = unpack_vector(v) if v is not None else (orjson.loads(rj) if rj is not None else None)
            except (orjson.JSONDecodeError, ValueError):
                result = None
            out.append(OutboxRow(t, s, result, r, ca, cr))
        return out

    def orphan_claims(self) -> list[ClaimRow]:
        """Journal rows with no outbox row: claimed, result never computed."""
        rows = self.db.query(
            "SELECT task_id, text, model, backend, created_at, claimed_at, reserved_at, attempts, dispatched, type FROM journal "
            "WHERE task_id NOT IN (SELECT task_id FROM outbox) ORDER BY claimed_at"
        )
        return [ClaimRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]), r[9]) for r in rows]


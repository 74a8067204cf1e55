"""Engine and session set-up for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Database:
    """The engine and its session factory; one per process.

    ``transact`` runs a whole transaction of synchronous Core code in one go. On
    SQLite that happens in a worker thread over the standard ``sqlite3`` driver: one
    thread hop per transaction, where the async driver hops to its thread for every
    cursor call (a dozen or more per transaction, each a GIL hand-off). The hot write
    paths (chat messages, document updates, the activity projection) use it.

    On SQLite these transactions take turns on an in-process lock: SQLite has one
    writer at a time anyway, and a writer that finds the database locked waits in
    SQLite's busy handler, which sleeps in steps of up to 100 ms; on the lock it
    goes the moment the other commits.
    """

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    sync_engine: Engine | None = None
    limiter: anyio.CapacityLimiter | None = None
    write_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def transact(self, work: Callable[[Connection], T]) -> T:
        """Run ``work(connection)`` in one transaction: committed if it returns."""
        if self.sync_engine is not None:
            return await anyio.to_thread.run_sync(
                self._transact_sync, work, limiter=self.limiter
            )
        async with self.engine.begin() as conn:
            return await conn.run_sync(work)

    async def read(self, work: Callable[[Connection], T]) -> T:
        """Run read-only ``work(connection)`` in one go, off the event loop: rows
        are turned into Python objects in the worker thread, not in the loop."""
        if self.sync_engine is not None:
            return await anyio.to_thread.run_sync(
                self._read_sync, work, limiter=self.limiter
            )
        async with self.engine.connect() as conn:
            return await conn.run_sync(work)

    def _read_sync(self, work: Callable[[Connection], T]) -> T:
        assert self.sync_engine is not None
        with self.sync_engine.connect() as conn:
            return work(conn)

    def _transact_sync(self, work: Callable[[Connection], T]) -> T:
        assert self.sync_engine is not None
        with self.write_lock, self.sync_engine.begin() as conn:
            return work(conn)

    async def ping(self) -> None:
        """Run a trivial query; raises if the database cannot be reached."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))


def _sqlite_pragmas(synchronous: str) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # WAL lets readers run beside the single writer; busy_timeout makes
        # writers queue instead of failing with "database is locked".
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=10000")
        # No checkpoint inside a commit: copying the WAL into the database there
        # stalls whichever writer crosses the threshold (a chat message or a
        # document update waiting hundreds of milliseconds). The checkpointer task
        # of open_database does it in the background instead.
        cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()

    return on_connect


def create_engine(url: str, *, sqlite_synchronous: str = "FULL") -> AsyncEngine:
    """Create an async engine with the settings each backend needs."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, pool_size=8, max_overflow=8)
        if sqlite_synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"bad SQLite synchronous mode {sqlite_synchronous!r}")
        event.listen(
            engine.sync_engine, "connect", _sqlite_pragmas(sqlite_synchronous.upper())
        )
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


@contextlib.asynccontextmanager
async def open_database(
    url: str, *, sqlite_synchronous: str = "FULL"
) -> AsyncIterator[Database]:
    """Open the database for the lifetime of the block; disposes the pool on exit."""
    engine = create_engine(url, sqlite_synchronous=sqlite_synchronous)
    sync_engine = None
    if engine.dialect.name == "sqlite":
        sync_url = make_url(url).set(drivername="sqlite")
        sync_engine = sa_create_engine(sync_url, pool_size=4, max_overflow=4)
        event.listen(
            sync_engine, "connect", _sqlite_pragmas(sqlite_synchronous.upper())
        )
    # A plain task, not a task group: errors raised by the caller's block must
    # reach the caller as themselves, not wrapped in an exception group.
    checkpointer = (
        asyncio.create_task(_checkpoints(sync_engine))
        if sync_engine is not None
        else None
    )
    try:
        yield Database(
            engine,
            async_sessionmaker(engine, expire_on_commit=False),
            sync_engine,
            anyio.CapacityLimiter(4),
        )
    finally:
        if checkpointer is not None:
            checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checkpointer
        await engine.dispose()
        if sync_engine is not None:
            with contextlib.suppress(Exception):
                _checkpoint(sync_engine)  # leave a short WAL behind
            sync_engine.dispose()


CHECKPOINT_INTERVAL = 1.0


async def _checkpoints(sync_engine: Engine) -> None:
    """Copy the SQLite WAL into the database every second, beside the writers
    (PASSIVE: it never blocks them, and does what it can when readers are busy)."""
    while True:
        await anyio.sleep(CHECKPOINT_INTERVAL)
        try:
            await anyio.to_thread.run_sync(_checkpoint, sync_engine)
        except Exception:
            log.exception("SQLite checkpoint failed; retrying")


def _checkpoint(sync_engine: Engine) -> None:
    with sync_engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")


def run_migrations(url: str, revision: str = "head") -> None:
    """Upgrade the schema to ``revision``. Synchronous: call it outside the event loop.

    On PostgreSQL an advisory lock serialises concurrent starts (several workers).
    """
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["database_url"] = url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (
        None,
        "",
        ":memory:",
    ):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(cfg, revision)

"""The database engine and its migrations.

:func:`create_engine` tunes each backend for the store's access pattern. SQLite gets WAL (readers
never block the writer), ``synchronous=NORMAL`` (durable across a process crash, one fsync per
checkpoint instead of per commit) and a 30 s busy timeout, set on every new connection, so that
short write transactions from several writers queue up instead of failing with ``database is
locked``. PostgreSQL gets ``pool_pre_ping`` so a restarted server costs no failed request. Both
hide bound parameters from error messages: they carry conversation content. A SQLite database
holds rotated tokens and every conversation, so its file is created 0600 before SQLite opens it
(SQLite gives its ``-wal``, ``-shm`` and journal files the database file's mode), and an
existing one and its side files are tightened to 0600 at start.

:func:`upgrade` runs ``alembic upgrade head`` on a connection of the application's own engine
(the alembic cookbook's connection sharing, driven through ``run_sync``); it is idempotent and
runs at every start-up, and a schema already at ``HEAD_REVISION`` is left without loading
alembic. The whole upgrade is one transaction that first takes the database's write lock (a
transaction-scoped advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so processes
starting together migrate one at a time and a failed migration leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, event, inspect, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

SIDE_FILES = ("-wal", "-shm", "-journal")
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
HEAD_REVISION = "0007"
"""The newest migration (``tests/test_migrations.py`` checks it is alembic's head): a database
already there is started without loading alembic at all, which would cost every process some
11 MiB of memory for nothing."""
_MIGRATION_LOCK_KEY = int.from_bytes(b"codexlb", "big")
_WAL_ATTEMPTS = 100


def create_engine(url: str) -> AsyncEngine:
    """An engine for ``sqlite+aiosqlite://`` or ``postgresql+asyncpg://`` URLs."""
    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        database = sa_url.database
        if database is not None and is_sqlite_file(database):
            path = Path(database).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            make_private(path)
        engine = create_async_engine(sa_url, hide_parameters=True)
        event.listen(
            engine.sync_engine, "connect", lambda connection, _: sqlite_pragmas(connection)
        )
        return engine
    return create_async_engine(
        sa_url, hide_parameters=True, pool_pre_ping=True, pool_size=10, max_overflow=20
    )


def is_sqlite_file(database: str) -> bool:
    """Whether the database part of a SQLite URL names a plain file (not memory, not a URI)."""
    return bool(database) and database != ":memory:" and not database.startswith("file:")


def make_private(database: Path) -> None:
    """Create the SQLite file ``database`` readable by its owner only, or make it and its side
    files so when they exist."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(database, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    for path in (database, *(Path(f"{database}{suffix}") for suffix in SIDE_FILES)):
        try:
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                path.chmod(mode & 0o700)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot make %s readable by its owner only: %s", path, exc.strerror)


async def upgrade(engine: AsyncEngine) -> None:
    """Apply every pending migration; a no-op when the schema is at head."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        elif conn.dialect.name == "sqlite":
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
        await conn.run_sync(_upgrade_on)


class BackupError(Exception):
    """The database cannot be backed up this way; the message says why."""


def backup_sqlite(url: str, destination: Path) -> None:
    """Copy a SQLite database while codexlb may be serving from it.

    SQLite's online backup copies a consistent snapshot page by page, WAL included, without
    stopping writers for long. PostgreSQL has ``pg_dump`` for this.
    """
    prefix = "sqlite+aiosqlite:///"
    if not url.startswith(prefix):
        raise BackupError("db backup copies SQLite databases; use pg_dump for PostgreSQL")
    source_path = Path(url[len(prefix) :])
    if not source_path.is_file():
        raise BackupError(f"{source_path}: no such database file")
    if destination.exists():
        raise BackupError(f"{destination}: already exists; choose a new file")
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)
    try:
        make_private(destination)
        target = sqlite3.connect(destination)
        try:
            source.backup(target, pages=1024)
        finally:
            target.close()
    finally:
        source.close()


def upgrade_url(url: str) -> None:
    """Synchronous entry point for ``codexlb db upgrade``."""

    async def run() -> None:
        engine = create_engine(url)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())


def alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _upgrade_on(connection: Connection) -> None:
    if _at_head(connection):
        return
    from alembic import command

    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _at_head(connection: Connection) -> bool:
    """Whether the schema is at ``HEAD_REVISION`` already (read as alembic records it)."""
    if not inspect(connection).has_table("alembic_version"):
        return False
    versions = connection.execute(text("SELECT version_num FROM alembic_version")).scalars()
    return list(versions) == [HEAD_REVISION]


def sqlite_pragmas(dbapi_connection: Any) -> None:
    """Set up a new SQLite connection: WAL, ``synchronous=NORMAL``, a 30 s busy timeout."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=30000")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _enable_wal(cursor: Any) -> None:
    """Switch to WAL, retrying while another connection switches the same new database.

    The switch needs an exclusive lock that SQLite takes without the busy handler, so connections
    racing on a new file see ``database is locked``; the switch is brief and happens once per file
    (WAL mode is persistent), so an immediate retry succeeds.
    """
    for attempt in range(_WAL_ATTEMPTS):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == _WAL_ATTEMPTS - 1:
                raise

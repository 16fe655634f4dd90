"""The durable snapshot store (S2, S7): one row per completed response.

Writes use group commit. :meth:`SnapshotStore.save` serializes the snapshot, queues it and waits;
a single writer task drains everything queued (up to the dialect's batch size), inserts it in one
short transaction, and then resolves every waiter, or fails every waiter of that batch with the
error. One writer per process means the database sees one write transaction at a time from us
(other processes queue on SQLite's busy timeout), and a burst of hundreds of responses completing
together costs a few commits instead of hundreds. A save returns only once its row is committed,
which is what lets the caller forward ``response.completed`` afterwards. Inserts ignore an id that
already exists (``ON CONFLICT DO NOTHING`` on both dialects), so a duplicate never fails the other
rows of its batch. A caller cancelled while waiting does not withdraw its row.

While saves arrive together (the last batch held more than one), the writer lets
``GATHER_TURNS`` turns of the event loop pass before it drains the queue, so that the responses
completing in them join the batch: PostgreSQL's ``commit_delay``, counted in loop turns, which
are short when little is going on and long under load. A lone save is never held back. Each
batch is one statement, and on PostgreSQL a round trip to the server (``bench/RESULTS.md`` has
what gathering saved).

Each row carries ``item_keys``, the keys of the output items that trace it
(``provenance.owner_keys``, mixed with the scope by ``scoped_key``); a trigger of the database
turns them into ``item_owners`` rows within the same statement, so knowing which account
produced an item costs the writer no statement of its own. ``owners`` reads them, and ``prune``
deletes them by the keys of the snapshots it deletes.

How a batch is inserted is the part that differs by dialect (`_BatchWriter`): on SQLite it is
one multi-row ``INSERT``, run on the event loop's thread unless it is large or must wait for a
lock, on PostgreSQL an asyncpg ``executemany`` in a transaction. Both are handed the driver's
own SQL, skipping SQLAlchemy's compilation and per-row conversion.

A chain is read in one statement, a recursive CTE that starts at the requested id and follows
``previous_response_id`` to the parent, keeping to the caller's scope at every hop::

    WITH RECURSIVE ancestry(response_id, previous_response_id) AS (
        SELECT response_id, previous_response_id FROM snapshots
         WHERE response_id = :response_id AND scope = :scope
        UNION
        SELECT parent.response_id, parent.previous_response_id
          FROM snapshots AS parent
          JOIN ancestry ON parent.response_id = ancestry.previous_response_id
         WHERE parent.scope = :scope)
    SELECT snapshots.* FROM snapshots JOIN ancestry USING (response_id)

``UNION`` (not ``UNION ALL``) keeps each row at most once, so the recursion ends after at most
one visit per row even on a cycle; walking the result from the requested id then detects a
missing or foreign ancestor (the walk finds no row) and a cycle (the walk meets a row twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import blake2b
from typing import Any

import orjson
from sqlalchemy import RowMapping, Select, delete, literal_column, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from codexlb.db import is_sqlite_file, sqlite_pragmas
from codexlb.errors import PreviousResponseNotFound
from codexlb.models import item_owners, snapshots
from codexlb.provenance import owner_keys

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]
"""A snapshot's values in ``_COLUMNS`` order, as the drivers take them."""

KEYS_PER_QUERY = 500
"""Keys looked up or deleted in one query: within SQLite's smallest limit on parameters (999)."""

GATHER_TURNS = 8
"""Event loop turns a batch waits for more saves while saves are arriving together."""

INLINE_BYTES = 64 * 1024
"""The largest batch SQLite gets on the event loop's thread (``_SqliteBatchWriter``)."""

CHECKPOINT_ROWS = 1000
"""Rows put in on the event loop's thread between two checkpoints of the WAL, run off it."""


@dataclass(slots=True)  # not frozen: one per response, and frozen fields cost a call each
class Snapshot:
    """One stored response; treated as immutable."""

    response_id: str
    previous_response_id: str | None
    scope: str
    """Client-key scope; the anonymous scope is a string like any other."""
    account: str
    """Name of the account that served the response."""
    model: str | None
    input_items: list[Any]
    """The request's input items as the client sent them (a delta, not the history)."""
    output_items: list[Any]
    """Output items in ``output_index`` order."""
    usage: dict[str, Any] | None
    created_at: datetime
    """Timezone-aware; read back as UTC."""


@dataclass(slots=True)
class _PendingSave:
    row: Row
    committed: asyncio.Future[None]


class SnapshotStore:
    """Snapshots in SQLite or PostgreSQL; each operation is its own short transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._batches = _batch_writer(engine)
        self._queue: asyncio.Queue[_PendingSave | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._previous_batch = 0
        """Saves in the last batch committed: more than one while saves arrive together."""
        self._in_flight = False
        """Whether the writer holds saves it has not committed yet."""
        self.batches_committed = 0
        """Transactions the writer has committed; a burst of saves shares a few of them."""

    async def start(self) -> None:
        if self._writer is not None or self._closed:
            raise RuntimeError("snapshot store already started")
        self._writer = asyncio.create_task(self._write_batches(), name="snapshot-writer")

    async def close(self) -> None:
        """Commit every save already queued, then stop the writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put_nowait(None)
            await self._writer

    async def save(self, snapshot: Snapshot) -> None:
        """Return once the snapshot is committed; an id already stored is left unchanged."""
        if self._closed:
            raise RuntimeError("snapshot store is closed")
        if self._writer is None or self._writer.done():
            raise RuntimeError("snapshot store is not running")
        if snapshot.created_at.tzinfo is None:
            raise ValueError("Snapshot.created_at must be timezone-aware")
        row = _to_row(snapshot, self._batches.timestamp)
        pending = _PendingSave(row, self._writer.get_loop().create_future())
        self._queue.put_nowait(pending)
        await pending.committed

    @property
    def busy(self) -> bool:
        """Whether a save made now would share its trip to the database: saves are arriving
        together, or another is queued or being committed."""
        return self._arriving_together or self._in_flight or not self._queue.empty()

    @property
    def _arriving_together(self) -> bool:
        return self._previous_batch > 1

    async def chain(self, scope: str, response_id: str) -> list[Snapshot]:
        """The ancestry of ``response_id``, oldest first, ending with ``response_id`` itself.

        Raises :class:`PreviousResponseNotFound` when the id is unknown or in another scope, or
        when an ancestor is missing, in another scope, or the chain cycles.
        """
        async with self._engine.connect() as conn:
            result = await conn.execute(_chain_statement(scope, response_id))
            rows = {row["response_id"]: row for row in result.mappings()}
        newest_first: list[Snapshot] = []
        current: str | None = response_id
        while current is not None:
            row = rows.pop(current, None)
            if row is None:
                raise PreviousResponseNotFound(response_id)
            newest_first.append(_from_row(row))
            current = row["previous_response_id"]
        newest_first.reverse()
        return newest_first

    async def owners(self, scope: str, keys: list[int]) -> dict[int, str]:
        """The accounts that produced the items of ``keys`` (``provenance.item_key``), for the
        keys known in ``scope``: one indexed query (a very long input takes one per
        ``KEYS_PER_QUERY`` keys)."""
        found: dict[int, str] = {}
        if not keys:
            return found
        scoped = {scoped_key(scope, key): key for key in keys}
        stored = list(scoped)
        async with self._engine.connect() as conn:
            for part in _parts(stored):
                query = select(item_owners.c.owner_key, item_owners.c.account).where(
                    item_owners.c.owner_key.in_(part)
                )
                found.update((scoped[key], account) for key, account in await conn.execute(query))
        return found

    async def get(self, scope: str, response_id: str) -> Snapshot | None:
        query = select(snapshots).where(
            snapshots.c.response_id == response_id, snapshots.c.scope == scope
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return None if row is None else _from_row(row)

    async def prune(self, older_than: datetime, batch_size: int) -> int:
        """Delete snapshots created before ``older_than``, ``batch_size`` per transaction, with
        the owners their items recorded (unless a later response recorded them again); returns
        the snapshots deleted.

        Neither table has an index by time, which every commit would write a page of. Owners
        are found by the keys in the deleted rows' ``item_keys``, by primary key. Old snapshots
        are, on PostgreSQL, found by ``ix_snapshots_created_at``; on SQLite, they are the first
        rows in the order they were stored (``rowid``), taken up to the first one that is not
        old: a row stored out of the order of ``created_at`` (another process's, or a clock set
        back) holds back the rows behind it until it is old itself."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if older_than.tzinfo is None:
            raise ValueError("older_than must be timezone-aware")
        in_order = self._engine.dialect.name == "sqlite"
        old = select(snapshots.c.response_id, snapshots.c.item_keys, snapshots.c.created_at)
        if in_order:
            old = old.order_by(literal_column("rowid"))
        else:
            old = old.where(snapshots.c.created_at < older_than)
        old = old.limit(batch_size)
        deleted = 0
        while True:
            async with self._engine.begin() as conn:
                rows = (await conn.execute(old)).all()
                count = len(rows)
                if in_order:
                    rows = list(itertools.takewhile(lambda row: row[2] < older_than, rows))
                keys = [key for row in rows if row[1] for key in orjson.loads(row[1])]
                for part in _parts(keys):
                    await conn.execute(
                        delete(item_owners).where(
                            item_owners.c.owner_key.in_(part), item_owners.c.created_at < older_than
                        )
                    )
                for part in _parts([row[0] for row in rows]):
                    await conn.execute(delete(snapshots).where(snapshots.c.response_id.in_(part)))
            deleted += len(rows)
            if len(rows) < count or count < batch_size:
                return deleted

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def _write_batches(self) -> None:
        try:
            await self._write_batches_until_closed()
        finally:
            await self._batches.close()

    async def _write_batches_until_closed(self) -> None:
        limit = self._batches.max_rows
        stopping = False
        while not stopping:
            item = await self._queue.get()
            self._in_flight = True
            try:
                if self._arriving_together:
                    await self._gather(limit)
                batch, stopping = self._drain(item, limit)
                self._previous_batch = len(batch)
                if batch:
                    await self._commit(batch)
            finally:
                self._in_flight = False

    def _drain(self, item: _PendingSave | None, limit: int) -> tuple[list[_PendingSave], bool]:
        """``item`` and the saves queued after it, up to ``limit``; and whether ``close`` came
        among them."""
        batch: list[_PendingSave] = []
        while item is not None:
            batch.append(item)
            if len(batch) >= limit or self._queue.empty():
                return batch, False
            item = self._queue.get_nowait()
        return batch, True

    async def _gather(self, limit: int) -> None:
        """Let up to ``GATHER_TURNS`` turns of the event loop pass, so that saves made in them
        join the batch; stop early once a full batch is waiting."""
        for _ in range(GATHER_TURNS):
            if self._queue.qsize() + 1 >= limit:
                return
            await asyncio.sleep(0)

    async def _commit(self, batch: list[_PendingSave]) -> None:
        try:
            await self._batches.insert([pending.row for pending in batch])
        except Exception as exc:
            logger.error("failed to store a batch of %d snapshots: %s", len(batch), exc)
            await self._batches.close()  # a fresh connection for the next batch
            for pending in batch:
                if not pending.committed.done():
                    pending.committed.set_exception(exc)
            return
        except BaseException:
            for pending in batch:
                pending.committed.cancel()
            raise
        self.batches_committed += 1
        for pending in batch:
            if not pending.committed.done():
                pending.committed.set_result(None)


_COLUMNS = tuple(snapshots.columns.keys())
"""The table's columns in order: ``_to_row`` gives its values in this order."""


class _BatchWriter(ABC):
    """How the writer task inserts a batch on one dialect, over a connection of its own that
    is kept between batches (no pool check-out and reset per batch)."""

    max_rows: int
    """Most rows in one batch."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._connection: AsyncConnection | None = None

    @staticmethod
    @abstractmethod
    def timestamp(moment: datetime) -> Any:
        """``created_at`` as the driver takes it: what ``models.snapshots`` would bind."""

    async def insert(self, rows: list[Row]) -> None:
        """Commit ``rows``, skipping ids already stored; all or nothing. (The database adds
        what their ``item_keys`` say to ``item_owners``.)"""
        if self._connection is None:
            self._connection = await self._engine.connect()
            try:
                await self._prepare(self._connection)
            except BaseException:
                await self.close()
                raise
        await self._insert(self._connection, rows)

    async def close(self) -> None:
        """Give the connection back (quietly: it may be the one that failed)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    @abstractmethod
    async def _prepare(self, connection: AsyncConnection) -> None:
        """Set a new connection up."""

    @abstractmethod
    async def _insert(self, connection: AsyncConnection, rows: list[Row]) -> None: ...


class _SqliteBatchWriter(_BatchWriter):
    """One multi-row ``INSERT`` per batch, in autocommit mode: a single statement is its own
    transaction.

    A batch of up to ``INLINE_BYTES`` of text is inserted on the event loop's own thread, over
    a connection of the writer's (a database file only). A lone row's insert takes some 40 µs
    there, where a trip to aiosqlite's thread and back added some 100 µs to the response's
    latency; under load the trips cost more than the inserts, for both threads contend for the
    GIL at each one (codexlb's CPU per relayed WebSocket event fell by a fifth to a quarter
    without them; ``bench/RESULTS.md``). That connection never waits and never blocks the loop
    on the disk: it has no busy timeout (a write lock held by another process sends the batch to
    aiosqlite's thread, to wait there) and no automatic checkpoint (one runs on aiosqlite's
    thread every ``CHECKPOINT_ROWS`` rows put in inline). A larger batch goes to aiosqlite's
    thread in one trip (through SQLAlchemy's adapter a batch took four: cursor,
    ``executemany``, close, commit)."""

    max_rows = 999 // len(_COLUMNS)
    """Within SQLite's smallest limit on parameters per statement (999, before 3.32)."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self._driver: Any = None
        self._inline: sqlite3.Connection | None = None
        self._inline_rows = 0
        """Rows put in inline since the last checkpoint."""

    @staticmethod
    def timestamp(moment: datetime) -> str:
        """UTC without an offset, as SQLAlchemy stores a SQLite ``DATETIME``."""
        return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")

    async def _prepare(self, connection: AsyncConnection) -> None:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        self._driver = (await connection.get_raw_connection()).driver_connection
        database = self._engine.url.database
        if database is not None and is_sqlite_file(database):
            inline = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
            sqlite_pragmas(inline)  # as every connection, then: never wait, never checkpoint
            inline.execute("PRAGMA busy_timeout=0")
            inline.execute("PRAGMA wal_autocheckpoint=0")
            self._inline = inline

    async def _insert(self, connection: AsyncConnection, rows: list[Row]) -> None:
        parameters = [value for row in rows for value in row]
        statement = _sqlite_insert(len(rows))
        if self._inline is not None and _texts_size(parameters) <= INLINE_BYTES:
            try:
                self._inline.execute(statement, parameters)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                    raise
            else:
                self._inline_rows += len(rows)
                if self._inline_rows >= CHECKPOINT_ROWS:
                    self._inline_rows = 0
                    await self._driver.execute("PRAGMA wal_checkpoint(PASSIVE)")
                return
        await self._driver.execute(statement, parameters)

    async def close(self) -> None:
        inline, self._inline = self._inline, None
        if inline is not None:
            inline.close()
        await super().close()


class _PostgresBatchWriter(_BatchWriter):
    """``executemany`` in one transaction: asyncpg sends the rows as one pipeline."""

    max_rows = 512

    @staticmethod
    def timestamp(moment: datetime) -> datetime:
        return moment.astimezone(UTC)

    async def _prepare(self, connection: AsyncConnection) -> None:
        """Nothing to set: each batch is its own transaction."""

    async def _insert(self, connection: AsyncConnection, rows: list[Row]) -> None:
        async with connection.begin():
            await connection.exec_driver_sql(_POSTGRES_INSERT, rows)


def _batch_writer(engine: AsyncEngine) -> _BatchWriter:
    if engine.dialect.name == "sqlite":
        return _SqliteBatchWriter(engine)
    if engine.dialect.name == "postgresql":
        return _PostgresBatchWriter(engine)
    raise ValueError(f"unsupported database dialect {engine.dialect.name!r}")


_INSERT_INTO = f"INSERT INTO snapshots ({', '.join(_COLUMNS)}) VALUES "
_IGNORING_DUPLICATES = " ON CONFLICT (response_id) DO NOTHING"
_POSTGRES_INSERT = (
    _INSERT_INTO
    + "("
    + ", ".join(f"${number}" for number in range(1, len(_COLUMNS) + 1))
    + ")"
    + _IGNORING_DUPLICATES
)


@functools.lru_cache(maxsize=_SqliteBatchWriter.max_rows)
def _sqlite_insert(rows: int) -> str:
    values = "(" + ", ".join("?" * len(_COLUMNS)) + ")"
    return _INSERT_INTO + ", ".join([values] * rows) + _IGNORING_DUPLICATES


def _chain_statement(scope: str, response_id: str) -> Select[Any]:
    ancestry = (
        select(snapshots.c.response_id, snapshots.c.previous_response_id)
        .where(snapshots.c.response_id == response_id, snapshots.c.scope == scope)
        .cte("ancestry", recursive=True)
    )
    parent = snapshots.alias("parent")
    ancestry = ancestry.union(
        select(parent.c.response_id, parent.c.previous_response_id)
        .join(ancestry, parent.c.response_id == ancestry.c.previous_response_id)
        .where(parent.c.scope == scope)
    )
    return select(snapshots).join(ancestry, snapshots.c.response_id == ancestry.c.response_id)


def _dump(value: Any) -> str:
    return orjson.dumps(value).decode()


def _to_row(snapshot: Snapshot, timestamp: Callable[[datetime], Any]) -> Row:
    """Serialize, and reject what a database would refuse, so it can only fail its own save."""
    texts = (
        snapshot.response_id,
        snapshot.previous_response_id,
        snapshot.scope,
        snapshot.account,
        snapshot.model,
    )
    for name, value in zip(_COLUMNS, texts, strict=False):
        if value is not None and _unstorable(value):
            raise ValueError(f"Snapshot.{name} is not storable text")
    return (
        *texts,
        _dump(snapshot.input_items),
        _dump(snapshot.output_items),
        None if snapshot.usage is None else _dump(snapshot.usage),
        timestamp(snapshot.created_at),
        _item_keys(snapshot.scope, snapshot.output_items),
    )


def scoped_key(scope: str, key: int) -> int:
    """``key`` as ``item_owners`` holds it in ``scope``: the same item in two scopes is two
    keys. (Still a signed 64-bit integer: the XOR of two.)"""
    return key ^ _scope_salt(scope)


@functools.lru_cache(maxsize=1024)
def _scope_salt(scope: str) -> int:
    digest = blake2b(scope.encode(errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _item_keys(scope: str, output: list[Any]) -> str | None:
    keys = owner_keys(output)
    if not keys:
        return None
    salt = _scope_salt(scope)
    return _dump([key ^ salt for key in keys])


def _parts(values: list[Any]) -> list[list[Any]]:
    """``values`` in lists of at most ``KEYS_PER_QUERY``: one ``IN`` each."""
    return [
        values[start : start + KEYS_PER_QUERY] for start in range(0, len(values), KEYS_PER_QUERY)
    ]


def _texts_size(values: list[Any]) -> int:
    """About the bytes ``values`` put in the database: their texts' lengths."""
    return sum([len(value) for value in values if type(value) is str])


def _unstorable(value: str) -> bool:
    """NUL and lone surrogates: PostgreSQL text cannot hold them."""
    if "\x00" in value:
        return True
    if value.isascii():
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


def _from_row(row: RowMapping) -> Snapshot:
    usage = row["usage"]
    return Snapshot(
        response_id=row["response_id"],
        previous_response_id=row["previous_response_id"],
        scope=row["scope"],
        account=row["account"],
        model=row["model"],
        input_items=orjson.loads(row["input_items"]),
        output_items=orjson.loads(row["output_items"]),
        usage=None if usage is None else orjson.loads(usage),
        created_at=row["created_at"],
    )

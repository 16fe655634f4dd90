"""The durable snapshot store (S2, S7): one row per completed response.

Writes use group commit. :meth:`SnapshotStore.save` serializes the snapshot, queues it and waits;
a single writer task drains everything queued (up to ``BATCH_LIMIT`` rows), inserts it with one
``executemany`` in one short transaction, and then resolves every waiter, or fails every waiter
of that batch with the error. One writer per process means SQLite sees one write transaction at a
time from us (other processes queue on the busy timeout), and a burst of hundreds of responses
completing together costs a few commits instead of hundreds. A save returns only once its row is
committed, which is what lets the caller forward ``response.completed`` afterwards. Inserts ignore
an id that already exists (``ON CONFLICT DO NOTHING`` on both dialects), so a duplicate never
fails the other rows of its batch. A caller cancelled while waiting does not withdraw its row.

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
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import RowMapping, Select, delete, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from codexlb.errors import PreviousResponseNotFound
from codexlb.models import snapshots

logger = logging.getLogger(__name__)

BATCH_LIMIT = 512
"""Most rows the writer commits in one transaction."""


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
    row: tuple[Any, ...]
    """The row's values in ``_COLUMNS`` order, as the driver takes them."""
    committed: asyncio.Future[None]


class SnapshotStore:
    """Snapshots in SQLite or PostgreSQL; each operation is its own short transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._insert, self._timestamp = _insert_ignoring_duplicates(engine.dialect.name)
        self._queue: asyncio.Queue[_PendingSave | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._writer_connection: AsyncConnection | None = None
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
        row = _to_row(snapshot, self._timestamp)
        pending = _PendingSave(row, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(pending)
        await pending.committed

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

    async def get(self, scope: str, response_id: str) -> Snapshot | None:
        query = select(snapshots).where(
            snapshots.c.response_id == response_id, snapshots.c.scope == scope
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return None if row is None else _from_row(row)

    async def prune(self, older_than: datetime, batch_size: int) -> int:
        """Delete rows created before ``older_than``, ``batch_size`` rows per transaction."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if older_than.tzinfo is None:
            raise ValueError("older_than must be timezone-aware")
        old_ids = (
            select(snapshots.c.response_id)
            .where(snapshots.c.created_at < older_than)
            .limit(batch_size)
        )
        statement = delete(snapshots).where(snapshots.c.response_id.in_(old_ids))
        deleted = 0
        while True:
            async with self._engine.begin() as conn:
                count = (await conn.execute(statement)).rowcount
            deleted += count
            if count < batch_size:
                return deleted

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def _write_batches(self) -> None:
        try:
            await self._write_batches_on_own_connection()
        finally:
            if self._writer_connection is not None:
                await self._writer_connection.close()
                self._writer_connection = None

    async def _write_batches_on_own_connection(self) -> None:
        stopping = False
        while not stopping:
            batch: list[_PendingSave] = []
            item = await self._queue.get()
            while True:
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                if len(batch) >= BATCH_LIMIT or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[_PendingSave]) -> None:
        try:
            # The writer keeps one connection: no pool check-out and reset per batch.
            if self._writer_connection is None:
                self._writer_connection = await self._engine.connect()
            conn = self._writer_connection
            async with conn.begin():
                await conn.exec_driver_sql(self._insert, [pending.row for pending in batch])
        except Exception as exc:
            logger.error("failed to store a batch of %d snapshots: %s", len(batch), exc)
            if self._writer_connection is not None:
                with contextlib.suppress(Exception):
                    await self._writer_connection.close()
                self._writer_connection = None
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


def _insert_ignoring_duplicates(dialect_name: str) -> tuple[str, Callable[[datetime], Any]]:
    """The batch insert in the driver's own SQL, and how the driver takes ``created_at``.

    The writer runs it with ``exec_driver_sql``: a batch of rows goes to the driver's
    ``executemany`` without being compiled and converted column by column, which took a
    quarter of the writer's time. The values are what ``models.snapshots`` would bind.
    """
    columns = ", ".join(_COLUMNS)
    if dialect_name == "sqlite":
        placeholders = ", ".join("?" for _ in _COLUMNS)
        timestamp: Callable[[datetime], Any] = _sqlite_timestamp
    elif dialect_name == "postgresql":
        placeholders = ", ".join(f"${number}" for number in range(1, len(_COLUMNS) + 1))
        timestamp = _utc
    else:
        raise ValueError(f"unsupported database dialect {dialect_name!r}")
    sql = (
        f"INSERT INTO snapshots ({columns}) VALUES ({placeholders}) "
        "ON CONFLICT (response_id) DO NOTHING"
    )
    return sql, timestamp


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _sqlite_timestamp(moment: datetime) -> str:
    """``created_at`` as SQLAlchemy stores a SQLite ``DATETIME``: UTC, without an offset."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


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


def _to_row(snapshot: Snapshot, timestamp: Callable[[datetime], Any]) -> tuple[Any, ...]:
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
    )


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

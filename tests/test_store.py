"""The snapshot store against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import event, func, insert, select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from codexlb import store as store_module
from codexlb.db import MIGRATIONS_DIR, alembic_config, create_engine, upgrade, upgrade_url
from codexlb.errors import PreviousResponseNotFound
from codexlb.models import snapshots
from codexlb.provenance import keys_of
from codexlb.store import GATHER_TURNS, Snapshot, SnapshotStore, _SqliteBatchWriter

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()

NOW = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)


def snap(
    response_id: str,
    previous_response_id: str | None = None,
    *,
    scope: str = "alice",
    created_at: datetime = NOW,
    content: str = "",
) -> Snapshot:
    return Snapshot(
        response_id=response_id,
        previous_response_id=previous_response_id,
        scope=scope,
        account="work-1",
        model="gpt-5-codex",
        input_items=[{"type": "message", "role": "user", "content": content or response_id}],
        output_items=[{"type": "message", "role": "assistant", "content": "ok"}],
        usage={"input_tokens": 3, "output_tokens": 1},
        created_at=created_at,
    )


@contextmanager
def count_statements(engine: AsyncEngine) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def insert_raw(engine: AsyncEngine, *rows: Snapshot) -> None:
    """Write rows directly, bypassing the store's checks (e.g. to build a cycle)."""
    async with engine.begin() as conn:
        await conn.execute(
            insert(snapshots),
            [
                {
                    "response_id": s.response_id,
                    "previous_response_id": s.previous_response_id,
                    "scope": s.scope,
                    "account": s.account,
                    "model": s.model,
                    "input_items": "[]",
                    "output_items": "[]",
                    "usage": None,
                    "created_at": s.created_at,
                }
                for s in rows
            ],
        )


async def test_save_get_round_trip(store: SnapshotStore) -> None:
    original = Snapshot(
        response_id="resp_1",
        previous_response_id=None,
        scope="",
        account="work-1",
        model=None,
        input_items=[
            {"type": "message", "content": [{"type": "input_text", "text": "héllo ✓ \u0000"}]},
            {"nested": {"list": [1, 2.5, True, False, None], "empty": {}}},
        ],
        output_items=[{"type": "reasoning", "encrypted_content": "gAAA=="}],
        usage=None,
        created_at=datetime(2025, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
    )
    await store.save(original)

    loaded = await store.get("", "resp_1")

    assert loaded is not None
    assert loaded.input_items == original.input_items
    assert loaded.output_items == original.output_items
    assert loaded.usage is None
    assert loaded.created_at == original.created_at
    assert loaded.created_at.utcoffset() == timedelta(0)
    assert loaded == Snapshot(**{**_fields(original), "created_at": loaded.created_at})
    assert await store.get("bob", "resp_1") is None
    assert await store.get("", "resp_unknown") is None


def _fields(s: Snapshot) -> dict[str, Any]:
    return {name: getattr(s, name) for name in Snapshot.__slots__}


async def test_chain_is_oldest_first(store: SnapshotStore) -> None:
    await store.save(snap("resp_a"))
    await store.save(snap("resp_b", "resp_a"))
    await store.save(snap("resp_c", "resp_b"))

    chain = await store.chain("alice", "resp_c")

    assert [s.response_id for s in chain] == ["resp_a", "resp_b", "resp_c"]
    assert chain[1] == snap("resp_b", "resp_a")
    assert [s.response_id for s in await store.chain("alice", "resp_a")] == ["resp_a"]


async def test_chain_read_is_one_statement(store: SnapshotStore, engine: AsyncEngine) -> None:
    ids = [f"resp_{i}" for i in range(20)]
    for parent, child in zip([None, *ids], ids, strict=False):
        await store.save(snap(child, parent))

    with count_statements(engine) as statements:
        chain = await store.chain("alice", ids[-1])

    assert [s.response_id for s in chain] == ids
    assert len(statements) == 1


async def test_chain_stays_in_scope(store: SnapshotStore) -> None:
    await store.save(snap("resp_bob", scope="bob"))
    await store.save(snap("resp_alice", "resp_bob", scope="alice"))

    with pytest.raises(PreviousResponseNotFound) as excinfo:
        await store.chain("alice", "resp_bob")
    assert excinfo.value.response_id == "resp_bob"
    with pytest.raises(PreviousResponseNotFound) as excinfo:
        await store.chain("alice", "resp_alice")
    assert excinfo.value.response_id == "resp_alice"
    assert [s.response_id for s in await store.chain("bob", "resp_bob")] == ["resp_bob"]


async def test_unknown_id_and_missing_ancestor(store: SnapshotStore) -> None:
    await store.save(snap("resp_orphan", "resp_gone"))

    with pytest.raises(PreviousResponseNotFound, match="'resp_nope' not found"):
        await store.chain("alice", "resp_nope")
    with pytest.raises(PreviousResponseNotFound, match="'resp_orphan' not found"):
        await store.chain("alice", "resp_orphan")


async def test_cycle_fails_cleanly(store: SnapshotStore, engine: AsyncEngine) -> None:
    await insert_raw(
        engine,
        snap("resp_x", "resp_z"),
        snap("resp_y", "resp_x"),
        snap("resp_z", "resp_y"),
        snap("resp_self", "resp_self"),
        snap("resp_tail", "resp_z"),
    )

    async with asyncio.timeout(5):
        for response_id in ("resp_x", "resp_self", "resp_tail"):
            with pytest.raises(PreviousResponseNotFound):
                await store.chain("alice", response_id)


async def test_concurrent_saves_are_group_committed(
    store: SnapshotStore, engine: AsyncEngine
) -> None:
    batches_before = store.batches_committed
    items = [snap(f"resp_{i:03}", content=f"turn {i}" * 50) for i in range(200)]

    await asyncio.gather(*(store.save(s) for s in items))

    batches = store.batches_committed - batches_before
    assert 1 <= batches < 20
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(snapshots)) == 200
    loaded = await asyncio.gather(*(store.get("alice", s.response_id) for s in items))
    assert loaded == items


async def test_saves_arriving_over_a_few_loop_turns_share_a_batch(
    store: SnapshotStore, engine: AsyncEngine
) -> None:
    await asyncio.gather(*(store.save(snap(f"resp_burst_{i}")) for i in range(5)))

    async def save_after(turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        await store.save(snap(f"resp_late_{turns}"))

    batches_before = store.batches_committed
    await asyncio.gather(*(save_after(turns) for turns in range(GATHER_TURNS)))

    assert store.batches_committed - batches_before == 1
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(snapshots)) == 5 + GATHER_TURNS


async def test_the_store_is_busy_while_saves_arrive_together(store: SnapshotStore) -> None:
    assert not store.busy
    await store.save(snap("resp_lone"))
    assert not store.busy

    burst = asyncio.gather(*(store.save(snap(f"resp_burst_{i}")) for i in range(3)))
    await asyncio.sleep(0)
    assert store.busy  # saves are queued
    await burst
    assert store.busy  # the last batch held three: more are likely to come together

    await store.save(snap("resp_lone_again"))
    assert not store.busy


async def test_two_writers_and_readers_share_the_database(
    engine: AsyncEngine, database_url: str
) -> None:
    """Two engines stand for two processes: writes queue on the busy timeout, never fail."""
    other_engine = create_engine(database_url)
    stores = [SnapshotStore(engine), SnapshotStore(other_engine)]
    try:
        for store in stores:
            await store.start()
        await stores[0].save(snap("resp_root"))
        saves = [stores[i % 2].save(snap(f"resp_{i}", "resp_root")) for i in range(200)]
        reads = [stores[i % 2].chain("alice", "resp_root") for i in range(50)]

        _, root_chains = await asyncio.gather(asyncio.gather(*saves), asyncio.gather(*reads))

        assert all(len(chain) == 1 for chain in root_chains)
        chains = await asyncio.gather(*(stores[1].chain("alice", f"resp_{i}") for i in range(200)))
        assert all(len(chain) == 2 for chain in chains)
    finally:
        for store in stores:
            await store.close()
        await other_engine.dispose()


async def test_duplicate_id_does_not_fail_its_batch(store: SnapshotStore) -> None:
    await store.save(snap("resp_dup", content="first"))

    await asyncio.gather(
        store.save(snap("resp_dup", content="second")),
        store.save(snap("resp_new_1")),
        store.save(snap("resp_new_1", content="same batch")),
        store.save(snap("resp_new_2")),
    )

    kept = await store.get("alice", "resp_dup")
    assert kept is not None
    assert kept.input_items[0]["content"] == "first"
    assert await store.get("alice", "resp_new_1") is not None
    assert await store.get("alice", "resp_new_2") is not None


async def test_unstorable_snapshot_fails_only_its_own_save(store: SnapshotStore) -> None:
    bad = Snapshot(**{**_fields(snap("resp_bad")), "model": "gpt\x00"})
    naive = Snapshot(**{**_fields(snap("resp_naive")), "created_at": datetime(2025, 1, 1)})

    results = await asyncio.gather(
        store.save(bad), store.save(naive), store.save(snap("resp_good")), return_exceptions=True
    )

    assert isinstance(results[0], ValueError)
    assert isinstance(results[1], ValueError)
    assert results[2] is None
    assert await store.get("alice", "resp_good") is not None


REFUSING_TRIGGER = {
    "sqlite": [
        "CREATE TRIGGER refuse BEFORE INSERT ON snapshots WHEN NEW.response_id = 'resp_refused' "
        "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
        "IF NEW.response_id = 'resp_refused' THEN RAISE EXCEPTION 'refused by a test trigger'; "
        "END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse BEFORE INSERT ON snapshots FOR EACH ROW EXECUTE FUNCTION refuse()",
    ],
}


async def test_a_refused_batch_fails_whole_and_the_next_one_commits(
    store: SnapshotStore, engine: AsyncEngine
) -> None:
    async with engine.begin() as conn:
        for statement in REFUSING_TRIGGER[engine.dialect.name]:
            await conn.exec_driver_sql(statement)
    ids = ["resp_ok_1", "resp_refused", "resp_ok_2"]

    # Queued in one turn of the event loop, the three saves share one batch.
    results = await asyncio.gather(*(store.save(snap(i)) for i in ids), return_exceptions=True)

    assert all(isinstance(result, Exception) for result in results), results
    assert "refused by a test trigger" in str(results[0])
    await store.save(snap("resp_after"))
    assert await store.get("alice", "resp_after") is not None
    assert [await store.get("alice", i) for i in ids] == [None, None, None]


async def test_sqlite_saves_wait_for_another_writer_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    """A save tries the loop's own thread first, where it must not wait: it goes on to wait
    off the loop."""
    path = tmp_path / "shared.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    store = SnapshotStore(engine)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await upgrade(engine)
        await store.start()
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction, say
        save = asyncio.ensure_future(store.save(snap("resp_waits")))
        started = time.monotonic()
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert time.monotonic() - started < 1.0  # the loop went on (the busy timeout is 30 s)
        assert not save.done()

        other.execute("COMMIT")

        await asyncio.wait_for(save, 5)
        assert await store.get("alice", "resp_waits") is not None
    finally:
        other.close()
        await store.close()
        await engine.dispose()


@pytest.mark.parametrize(("inline_bytes", "in_file"), [(64 * 1024, 10), (0, 0)])
async def test_lone_sqlite_saves_reach_the_database_file_through_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline_bytes: int, in_file: int
) -> None:
    """A small batch is put in on the event loop's thread, over a connection that never
    checkpoints by itself; the writer checkpoints the WAL every
    ``CHECKPOINT_ROWS`` of them, off the loop, so the rows reach the database file and the WAL
    does not grow forever. A batch over ``INLINE_BYTES`` goes to aiosqlite's thread instead,
    whose connection checkpoints only once the WAL is large: none of its rows are in the file
    yet."""
    monkeypatch.setattr(store_module, "CHECKPOINT_ROWS", 5)
    monkeypatch.setattr(store_module, "INLINE_BYTES", inline_bytes)
    path = tmp_path / "lone.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    store = SnapshotStore(engine)
    try:
        await upgrade(engine)
        await store.start()
        for i in range(12):
            await store.save(snap(f"resp_lone_{i}"))  # one at a time: each its own batch
        # The file as it is without its WAL: what the checkpoints copied into it.
        frozen = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
        try:
            tables = {name for (name,) in frozen.execute("SELECT name FROM sqlite_master")}
            count = 0
            if "snapshots" in tables:  # even the schema may be in the WAL alone
                (count,) = frozen.execute("SELECT count(*) FROM snapshots").fetchone()
        finally:
            frozen.close()
        assert count == in_file
        assert await store.get("alice", "resp_lone_11") is not None  # the rest, in the WAL
    finally:
        await store.close()
        await engine.dispose()


async def test_prune_deletes_old_rows_in_batches(store: SnapshotStore, engine: AsyncEngine) -> None:
    cutoff = NOW - timedelta(days=30)
    old = [snap(f"resp_old_{i}", created_at=cutoff - timedelta(hours=i + 1)) for i in range(7)]
    new = [snap(f"resp_new_{i}", created_at=cutoff + timedelta(hours=i)) for i in range(3)]
    await asyncio.gather(*(store.save(s) for s in old + new))

    with count_statements(engine) as statements:
        deleted = await store.prune(cutoff, batch_size=3)

    assert deleted == 7
    deletes = [s for s in statements if s.lstrip().upper().startswith("DELETE FROM SNAPSHOTS")]
    assert len(deletes) == math.ceil(7 / 3)
    for s in old:
        assert await store.get("alice", s.response_id) is None
    for s in new:
        assert await store.get("alice", s.response_id) == s
    assert await store.prune(cutoff, batch_size=3) == 0


async def test_prune_takes_rows_in_the_order_sqlite_stored_them(
    store: SnapshotStore, engine: AsyncEngine
) -> None:
    """SQLite finds old rows in the order they were stored: one stored out of the order of
    time holds back those behind it until it is old itself. PostgreSQL finds them by time."""
    cutoff = NOW - timedelta(days=30)
    for name, created_at in [
        ("resp_old_1", cutoff - timedelta(hours=2)),
        ("resp_new", cutoff + timedelta(hours=1)),
        ("resp_old_2", cutoff - timedelta(hours=1)),
    ]:
        await store.save(snap(name, created_at=created_at))

    deleted = await store.prune(cutoff, batch_size=10)

    held_back = engine.dialect.name == "sqlite"
    assert deleted == (1 if held_back else 2)
    assert await store.get("alice", "resp_old_1") is None
    assert (await store.get("alice", "resp_old_2") is not None) is held_back
    assert await store.get("alice", "resp_new") is not None
    assert await store.prune(cutoff + timedelta(hours=2), batch_size=10) == 3 - deleted


async def test_close_flushes_and_rejects_later_saves(engine: AsyncEngine) -> None:
    store = SnapshotStore(engine)
    await store.start()
    pending = asyncio.ensure_future(store.save(snap("resp_last")))
    await asyncio.sleep(0)

    await store.close()

    assert pending.done()
    await pending
    with pytest.raises(RuntimeError, match="closed"):
        await store.save(snap("resp_late"))
    await store.close()
    reader = SnapshotStore(engine)
    assert await reader.get("alice", "resp_last") is not None
    assert await reader.get("alice", "resp_late") is None


async def test_save_before_start_raises(engine: AsyncEngine) -> None:
    with pytest.raises(RuntimeError, match="not running"):
        await SnapshotStore(engine).save(snap("resp_early"))


async def test_ping(store: SnapshotStore) -> None:
    await store.ping()


async def test_ping_raises_when_unreachable() -> None:
    engine = create_engine("postgresql+asyncpg://postgres@127.0.0.1:1/codexlb")
    try:
        with pytest.raises(OSError, match=r"Connect call failed|Connection refused"):
            await SnapshotStore(engine).ping()
    finally:
        await engine.dispose()


async def test_upgrade_twice_is_a_no_op(store: SnapshotStore, engine: AsyncEngine) -> None:
    await store.save(snap("resp_kept"))

    await upgrade(engine)

    async with engine.connect() as conn:
        versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    assert [v for (v,) in versions] == [HEAD]
    assert await store.get("alice", "resp_kept") is not None


async def test_concurrent_upgrades(database_url: str) -> None:
    engines = [create_engine(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(upgrade(e) for e in engines))
    finally:
        for e in engines:
            await e.dispose()


async def test_sqlite_engine_settings(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "codexlb.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with engine.connect() as conn:
            pragmas = [
                (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout")
            ]
    finally:
        await engine.dispose()
    assert pragmas == ["wal", 1, 30000]
    assert path.exists()


async def test_upgrade_url_and_alembic_cli(tmp_path: Path) -> None:
    """``codexlb db upgrade`` and the plain alembic CLI build the same schema."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {MIGRATIONS_DIR}\nsqlalchemy.url = {url}\n")

    await asyncio.to_thread(upgrade_url, url)
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "alembic", "-c", str(ini), "current"],
        capture_output=True,
        text=True,
        check=False,
        cwd=MIGRATIONS_DIR.parent,
    )

    assert cli.returncode == 0, cli.stderr
    assert f"{HEAD} (head)" in cli.stdout


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 21, 15, 3, 14, 123456, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-7))),
        datetime(999, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
    ],
)
def test_the_writer_stores_created_at_on_sqlite_as_the_table_type_would(moment: datetime) -> None:
    dialect = sqlite.dialect()
    bind = snapshots.c.created_at.type._cached_bind_processor(dialect)
    assert bind is not None

    assert _SqliteBatchWriter.timestamp(moment) == bind(moment)


def produced(response_id: str, account: str, output: list[dict[str, Any]], **kw: Any) -> Snapshot:
    snapshot = snap(response_id, **kw)
    snapshot.account = account
    snapshot.output_items = output
    return snapshot


REASONING = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "enc:x:00"}
CALL = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}"}
CALL_3 = {**CALL, "id": "fc_3", "call_id": "call_3"}
ANSWER = {
    "type": "message",
    "role": "assistant",
    "content": [{"type": "output_text", "text": "done", "annotations": []}],
}


async def test_owners_of_output_items_as_a_client_resends_them(store: SnapshotStore) -> None:
    await store.save(produced("resp_1", "work-1", [REASONING, CALL]))
    await store.save(produced("resp_2", "work-2", [ANSWER]))
    await store.save(produced("resp_3", "work-1", [{**CALL, "call_id": "call_2"}, CALL_3]))
    # Codex resends items without their server ids, and messages with their text alone.
    resent = [
        {k: v for k, v in REASONING.items() if k != "id"},
        {k: v for k, v in CALL.items() if k != "id"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "done"}],
        },
        {"type": "reasoning", "summary": [], "encrypted_content": "enc:never-seen:00"},
        {k: v for k, v in CALL_3.items() if k != "id"},
    ]
    keys = keys_of(resent)
    assert len(keys) == 5

    owners = await store.owners("alice", keys)

    # A response is traced by its reasoning, or else by its last item (provenance.owner_keys).
    assert owners == {keys[0]: "work-1", keys[2]: "work-2", keys[4]: "work-1"}
    assert await store.owners("bob", keys) == {}  # scoped like the snapshots
    assert await store.owners("alice", []) == {}


async def test_the_latest_producer_of_a_key_owns_it(store: SnapshotStore) -> None:
    await store.save(produced("resp_1", "work-1", [ANSWER]))
    await store.save(produced("resp_2", "work-2", [ANSWER]))
    assert await store.owners("alice", keys_of([ANSWER])) == {keys_of([ANSWER])[0]: "work-2"}


async def test_a_long_input_is_looked_up_whole(store: SnapshotStore) -> None:
    reasoning = [{**REASONING, "encrypted_content": f"enc:x:{i}"} for i in range(1200)]
    await store.save(produced("resp_1", "work-1", reasoning))
    owners = await store.owners("alice", keys_of(reasoning))
    assert len(owners) == 1200
    assert set(owners.values()) == {"work-1"}


async def test_prune_forgets_old_owners(store: SnapshotStore) -> None:
    cutoff = NOW - timedelta(days=30)
    await store.save(produced("resp_old", "work-1", [CALL], created_at=cutoff - timedelta(hours=1)))
    await store.save(produced("resp_new", "work-1", [REASONING], created_at=cutoff))

    await store.prune(cutoff, batch_size=1)

    keys = keys_of([CALL, REASONING])
    assert await store.owners("alice", keys) == {keys[1]: "work-1"}


async def test_prune_keeps_an_owner_a_later_response_recorded_again(store: SnapshotStore) -> None:
    cutoff = NOW - timedelta(days=30)
    await store.save(produced("resp_old", "work-1", [CALL], created_at=cutoff - timedelta(hours=1)))
    await store.save(produced("resp_new", "work-2", [CALL], created_at=cutoff))

    assert await store.prune(cutoff, batch_size=10) == 1

    assert await store.owners("alice", keys_of([CALL])) == {keys_of([CALL])[0]: "work-2"}


async def test_prune_forgets_every_owner_of_a_long_response(store: SnapshotStore) -> None:
    """More keys than one query takes: they go in several."""
    cutoff = NOW - timedelta(days=30)
    reasoning = [{**REASONING, "encrypted_content": f"enc:x:{i}"} for i in range(1200)]
    old = cutoff - timedelta(hours=1)
    await store.save(produced("resp_old", "work-1", reasoning, created_at=old))

    assert await store.prune(cutoff, batch_size=1) == 1

    assert await store.owners("alice", keys_of(reasoning)) == {}


async def test_owners_commit_with_their_snapshot_and_only_then(store: SnapshotStore) -> None:
    await store.save(produced("resp_1", "work-1", [ANSWER]))
    await store.save(produced("resp_1", "work-2", [CALL]))  # the same id: ignored
    keys = keys_of([ANSWER, CALL])
    assert await store.owners("alice", keys) == {keys[0]: "work-1"}

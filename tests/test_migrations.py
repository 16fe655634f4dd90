"""The migrations are the only source of the schema, and the table definitions the code
queries with describe exactly what they build, on SQLite and on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from hashlib import blake2b
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from codexlb.db import HEAD_REVISION, alembic_config, create_engine, upgrade
from codexlb.models import metadata
from codexlb.provenance import keys_of
from codexlb.store import SnapshotStore


def differences(connection: Connection) -> list[Any]:
    dialect = connection.dialect.name

    def built_here(item: Any, name: str | None, kind: str, reflected: bool, _: Any) -> bool:
        """An index whose ``info`` names other dialects is not built on this one."""
        dialects = item.info.get("dialects") if kind == "index" and not reflected else None
        return dialects is None or dialect in dialects

    options = {"compare_type": True, "include_object": built_here}
    context = MigrationContext.configure(connection, opts=options)
    return list(compare_metadata(context, metadata))


async def test_the_migrations_build_the_tables_the_code_describes(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        found = await connection.run_sync(differences)
    assert found == []


def test_every_table_is_described_in_one_metadata() -> None:
    assert set(metadata.tables) == {
        "snapshots",
        "item_owners",
        "account_credentials",
        "key_usage",
        "account_knowledge",
        "affinity",
        "key_counters",
        "replicas",
    }


async def test_owners_recorded_before_the_integer_keys_are_carried_over(database_url: str) -> None:
    """A conversation recorded under migration 0003 keeps its owners after 0004."""
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(lambda sync: _upgrade_to(sync, "0003"))
            reasoning = {"type": "reasoning", "summary": [], "encrypted_content": "enc:a:01"}
            digest = blake2b(b"enc:a:01", digest_size=16).hexdigest()
            old_row = "(:scope, :key, 'work-1', 'resp_1', :at)"
            insert = f"INSERT INTO item_owners VALUES {old_row}"
            now = datetime.now(UTC)
            await connection.execute(
                text(insert), {"scope": "alice", "key": f"r:{digest}", "at": now}
            )
            await connection.execute(
                text(insert), {"scope": "alice", "key": "c:not-hex", "at": now}
            )
        await upgrade(engine)
        store = SnapshotStore(engine)
        await store.start()
        try:
            keys = keys_of([reasoning])
            assert await store.owners("alice", keys) == {keys[0]: "work-1"}
            assert await store.owners("bob", keys) == {}
        finally:
            await store.close()
    finally:
        await engine.dispose()


async def test_a_snapshot_stored_under_0003_takes_its_owners_when_pruned(
    database_url: str,
) -> None:
    """0007 rewrites 0003's text keys in ``item_keys`` to the integers 0004 gave the owners."""
    engine = create_engine(database_url)
    reasoning = {"type": "reasoning", "summary": [], "encrypted_content": "enc:a:01"}
    digest = blake2b(b"enc:a:01", digest_size=16).hexdigest()
    old = datetime(2025, 1, 1, tzinfo=UTC)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(lambda sync: _upgrade_to(sync, "0003"))
            await connection.execute(
                text(
                    "INSERT INTO snapshots VALUES (:id, NULL, 'alice', 'work-1', NULL, '[]', "
                    "'[]', NULL, :at, :keys)"
                ),
                [
                    {"id": "resp_1", "at": old, "keys": f'["r:{digest}"]'},
                    {"id": "resp_2", "at": datetime.now(UTC), "keys": None},
                ],
            )
        await upgrade(engine)
        store = SnapshotStore(engine)
        await store.start()
        try:
            keys = keys_of([reasoning])
            assert await store.owners("alice", keys) == {keys[0]: "work-1"}
            assert await store.prune(old + timedelta(days=1), batch_size=10) == 1
            assert await store.owners("alice", keys) == {}
            assert await store.get("alice", "resp_2") is not None
        finally:
            await store.close()
    finally:
        await engine.dispose()


def _upgrade_to(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def test_the_migrations_go_down_and_up_again(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(lambda sync: _downgrade_to(sync, "0003"))
        await connection.run_sync(lambda sync: _upgrade_to(sync, "head"))
        assert await connection.run_sync(differences) == []


def _downgrade_to(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


def test_the_head_revision_the_code_names_is_alembics_head() -> None:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head == HEAD_REVISION


def test_a_database_at_head_starts_without_loading_alembic(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'codexlb.db'}"
    program = f"""
import sys
from codexlb.db import upgrade_url
upgrade_url({url!r})
"""
    second = f"""
import sys
from codexlb.db import upgrade_url
upgrade_url({url!r})
print("alembic" in sys.modules, "asyncpg" in sys.modules)
"""
    subprocess.run([sys.executable, "-c", program], check=True, timeout=60)
    shown = subprocess.run(
        [sys.executable, "-c", second], check=True, timeout=60, capture_output=True, text=True
    )
    assert shown.stdout.split() == ["False", "False"]

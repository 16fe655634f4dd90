"""The migrations are the only source of the schema, and the table definitions the code
queries with describe exactly what they build, on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from codexlb.models import metadata


def differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_the_migrations_build_the_tables_the_code_describes(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        found = await connection.run_sync(differences)
    assert found == []


def test_every_table_is_described_in_one_metadata() -> None:
    assert set(metadata.tables) == {"snapshots", "item_owners", "account_credentials"}

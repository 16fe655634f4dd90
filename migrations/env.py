"""Alembic environment.

The application runs migrations on its own engine: :func:`codexlb.db.upgrade` passes a live
synchronous connection in ``config.attributes["connection"]`` (alembic cookbook, "Using Asyncio
with Alembic"). The plain ``alembic`` CLI works too, given ``sqlalchemy.url`` (an async URL such
as ``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``); ``--sql`` renders offline SQL.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import async_engine_from_config

from codexlb.models import metadata

config = context.config


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_from_url() -> None:
    engine = async_engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


def main() -> None:
    if context.is_offline_mode():
        run_migrations_offline()
        return
    connection = config.attributes.get("connection")
    if connection is None:
        asyncio.run(run_migrations_from_url())
    else:
        run_migrations(connection)


main()

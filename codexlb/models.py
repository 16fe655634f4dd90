"""Every table of codexlb as SQLAlchemy Core metadata.

The alembic migrations in ``migrations/`` are the only source of the schema; this module
describes the same tables for queries (and for ``alembic revision --autogenerate``).

JSON payloads live in ``Text`` columns serialized by the store itself: cheap, and identical on
SQLite and PostgreSQL. ``created_at`` is stored in UTC; :class:`UtcDateTime` makes every value
that crosses the boundary timezone-aware UTC, because SQLite keeps no offset.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, DateTime, Dialect, Index, MetaData, String, Table, Text
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime, normalized to UTC on the way in and out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("datetime must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


snapshots = Table(
    "snapshots",
    metadata,
    Column("response_id", String(), primary_key=True),
    Column("previous_response_id", String(), nullable=True),
    Column("scope", String(), nullable=False),
    Column("account", String(), nullable=False),
    Column("model", String(), nullable=True),
    Column("input_items", Text, nullable=False),
    Column("output_items", Text, nullable=False),
    Column("usage", Text, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("item_keys", Text, nullable=True),
    Index("ix_snapshots_created_at", "created_at"),
)


item_owners = Table(
    "item_owners",
    metadata,
    Column("scope", String(), primary_key=True),
    Column("item_key", String(), primary_key=True),
    Column("account", String(), nullable=False),
    Column("response_id", String(), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_item_owners_created_at", "created_at"),
)
"""Which account produced each output item of the stored responses, per client-key scope:
written by the database itself, from ``snapshots.item_keys`` (see migration 0003)."""


account_credentials = Table(
    "account_credentials",
    metadata,
    Column("account", String(), primary_key=True),
    Column("access_token", Text, nullable=True),
    Column("refresh_token", Text, nullable=True),
    Column("id_token", Text, nullable=True),
    Column("account_id", String(), nullable=True),
    Column("source_fingerprint", String(), nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)
"""Rotated tokens of inline accounts (``credential_store``)."""

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

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
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


OwnerKey = BigInteger().with_variant(Integer(), "sqlite")
"""A signed 64-bit key; on SQLite an ``INTEGER PRIMARY KEY`` is the table's rowid: one b-tree
for the table and its key."""


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
    Index("ix_snapshots_created_at", "created_at", info={"dialects": ("postgresql",)}).ddl_if(
        dialect="postgresql"
    ),
)
"""On SQLite, rows are in the order they were stored (``rowid``), which is the order of
``created_at``, and pruning walks them so (``SnapshotStore.prune``): no index by time, which each
commit would write a page of. PostgreSQL has no such order and keeps the index (``info`` names
the dialects an index is built on, for the schema's test)."""


item_owners = Table(
    "item_owners",
    metadata,
    Column("owner_key", OwnerKey, primary_key=True, autoincrement=False),
    Column("account", String(), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)
"""Which account produced the items that trace each stored response
(``provenance.owner_keys``): written by the database itself, from ``snapshots.item_keys`` (see
migration 0004). ``owner_key`` is the item's key mixed with its client-key scope
(``store.scoped_key``), so one integer finds an item of one scope. No other index: pruning
finds owners through the keys of the snapshots it deletes (migration 0007), and ``created_at``
tells whether a later response recorded an owner again."""


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


Count = BigInteger().with_variant(Integer(), "sqlite")


key_usage = Table(
    "key_usage",
    metadata,
    Column("client_key", String(), primary_key=True),
    Column("minute", Count, primary_key=True, autoincrement=False),
    Column("account", String(), primary_key=True),
    Column("model", String(), primary_key=True),
    Column("requests", Count, nullable=False),
    Column("input_tokens", Count, nullable=False),
    Column("cached_input_tokens", Count, nullable=False),
    Column("output_tokens", Count, nullable=False),
    Column("reasoning_tokens", Count, nullable=False),
    Index("ix_key_usage_minute", "minute"),
)
"""What each client key used (SPEC S9), per minute, account and model (``usage``): the rolling
windows of the key's limits, ``GET /v1/usage`` and ``codexlb usage`` read it. ``minute`` is the
bucket's start in epoch seconds; ``client_key`` is the key's name ('' in open access), ``account``
is '' for a request no account took, ``model`` '' when the request named none."""


account_knowledge = Table(
    "account_knowledge",
    metadata,
    Column("account", String(), primary_key=True),
    Column("identity", String(), nullable=False),
    Column("cooldown_until", Double(), nullable=False),
    Column("rate_limited_until", Double(), nullable=False),
    Column("reason", String(), nullable=True),
    Column("usage_at", Double(), nullable=False),
    Column("primary_used", Double(), nullable=False),
    Column("primary_resets_at", Double(), nullable=False),
    Column("secondary_used", Double(), nullable=False),
    Column("secondary_resets_at", Double(), nullable=False),
    Column("refused", String(), nullable=True),
    Column("retry_at", Double(), nullable=False),
    Column("refused_at", Double(), nullable=False),
)
"""What the replicas learned about each account (``knowledge.Knowledge``, SPEC S12)."""


affinity = Table(
    "affinity",
    metadata,
    Column("slot", String(), primary_key=True),
    Column("account", String(), nullable=False),
    Column("expires_at", Double(), nullable=False),
    Index("ix_affinity_expires_at", "expires_at"),
)
"""Soft affinity shared by the replicas: a ``session-id`` / ``prompt_cache_key`` slot → account."""


key_counters = Table(
    "key_counters",
    metadata,
    Column("counter", String(), primary_key=True),
    Column("second", BigInteger(), primary_key=True, autoincrement=False),
    Column("count", Integer(), nullable=False),
)
"""Per-second buckets of the counters the replicas share (``shared.SharedState.take``)."""


replicas = Table(
    "replicas",
    metadata,
    Column("replica", String(), primary_key=True),
    Column("heartbeat_at", UtcDateTime, nullable=False),
    Column("inflight", Text, nullable=False),
)
"""One row per live replica: its heartbeat and in-flight leases per account (JSON)."""

"""Rotated tokens of inline accounts, kept in the database (SPEC S5).

An OAuth refresh rotates the refresh token: the one written in the TOML is dead after the first
refresh. ``auth_file`` accounts get the new tokens written back to their file; inline accounts
get a row here, so a restart (or another replica on the same PostgreSQL database) continues with
the live refresh token instead of the dead one.

Each row remembers a fingerprint of the refresh token the TOML gave when the row's token family
began (:func:`source_fingerprint`). At start-up the row is used only while the TOML still gives
that same refresh token: when the operator pastes new credentials into the TOML, the row is
stale and ignored (and replaced at the next refresh).

:meth:`CredentialStore.exclusive` is the cross-process half of single-flight refreshing: on
PostgreSQL a transaction-scoped advisory lock per account, so replicas sharing the database
refresh one at a time and the later one finds the earlier one's row instead of reusing a dead
refresh token. On SQLite it is a no-op: one process serves a SQLite database, and the
in-process single-flight suffices.

    account_credentials
      account             text, primary key     the [[accounts]] name
      access_token        text, null
      refresh_token       text, null
      id_token            text, null
      account_id          text, null            chatgpt-account-id
      source_fingerprint  text                  sha256 of the TOML's refresh token
      updated_at          timestamptz

Tokens are stored as they are sent upstream (the database is as sensitive as the TOML).

:class:`InlineTokens` is the credential source (``credentials.Source``) of an account whose
tokens are written in the TOML: it reads and writes its row here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Insert, RowMapping, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from codexlb.config import AccountConfig
from codexlb.credentials import Credentials, Source, configured_tokens
from codexlb.models import account_credentials

log = logging.getLogger(__name__)

_FINGERPRINT_PREFIX = b"codexlb-toml-refresh-token\x00"
_LOCK_PREFIX = b"codexlb-credentials-lock\x00"


def source_fingerprint(refresh_token: str) -> str:
    """What a row remembers of the TOML's refresh token: a SHA-256, never the token."""
    return hashlib.sha256(_FINGERPRINT_PREFIX + refresh_token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredCredentials:
    """One row. ``repr`` shows no token."""

    account: str
    credentials: Credentials
    source_fingerprint: str = field(repr=False)
    updated_at: datetime


class CredentialStore:
    """The ``account_credentials`` table; each operation is its own short transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._upsert = _upsert(engine.dialect.name)

    async def get(self, account: str) -> StoredCredentials | None:
        query = select(account_credentials).where(account_credentials.c.account == account)
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return None if row is None else _from_row(row)

    async def load_all(self) -> dict[str, StoredCredentials]:
        """Every row, by account name (one query, for start-up)."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(account_credentials))).mappings().all()
        return {row["account"]: _from_row(row) for row in rows}

    async def save(
        self, account: str, credentials: Credentials, *, source_fingerprint: str
    ) -> None:
        """Insert or replace the row of ``account``; ``updated_at`` is now."""
        row: dict[str, Any] = {
            "account": account,
            "access_token": credentials.access_token,
            "refresh_token": credentials.refresh_token,
            "id_token": credentials.id_token,
            "account_id": credentials.account_id,
            "source_fingerprint": source_fingerprint,
            "updated_at": datetime.now(UTC),
        }
        async with self._engine.begin() as conn:
            await conn.execute(self._upsert, row)

    async def delete(self, account: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                account_credentials.delete().where(account_credentials.c.account == account)
            )

    @asynccontextmanager
    async def exclusive(self, account: str) -> AsyncIterator[None]:
        """Hold the cross-process refresh lock of ``account`` for the ``async with`` block.

        PostgreSQL: ``pg_advisory_xact_lock`` in a transaction of its own connection, released
        when the block ends (or when the connection dies). SQLite: no lock (see the module
        docstring). Database errors propagate (SQLAlchemy's).
        """
        if self._engine.dialect.name != "postgresql":
            yield
            return
        async with self._engine.connect() as conn, conn.begin():
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(account)}
            )
            yield


class InlineTokens(Source):
    """ChatGPT tokens written in the TOML; their rotated successors are this table's row.

    Without a refresh token (or without a database) there is no row to read, write or lock.
    """

    def __init__(self, account: AccountConfig, store: CredentialStore | None) -> None:
        self._account = account
        self._store = store
        refresh_token = account.refresh_token
        self._fingerprint = (
            source_fingerprint(refresh_token.get_secret_value()) if refresh_token else None
        )
        self.in_database = store is not None and self._fingerprint is not None

    def load(self) -> Credentials:
        return configured_tokens(self._account)

    def stored(self, row: StoredCredentials) -> Credentials | None:
        if self._fingerprint is None or row.source_fingerprint != self._fingerprint:
            return None
        # The configured account id wins: the operator's word over a token's claim.
        account_id = self._account.chatgpt_account_id or row.credentials.account_id
        return replace(row.credentials, account_id=account_id)

    async def newer_copy(self, account: str, current: Credentials) -> Credentials | None:
        if self._store is None or not self.in_database:
            return None
        row = await self._store.get(account)
        stored = None if row is None else self.stored(row)
        if stored is None or stored.refresh_token == current.refresh_token:
            return None
        log.info("account %s: adopted tokens another codexlb process refreshed", account)
        return stored

    async def persist(self, account: str, renewed: Credentials, *, replacing: str) -> None:
        if self._store is None or self._fingerprint is None:
            log.warning(
                "account %s: no database to keep its rotated refresh token; a restart would "
                "reuse the dead one from the configuration",
                account,
            )
            return
        try:
            await self._store.save(account, renewed, source_fingerprint=self._fingerprint)
        except (SQLAlchemyError, OSError) as exc:
            log.error(
                "account %s: refreshed tokens could not be stored (%s); a restart would reuse "
                "a dead refresh token",
                account,
                type(exc).__name__,
            )

    def exclusive(self, account: str) -> AbstractAsyncContextManager[None]:
        if self._store is None or not self.in_database:
            return contextlib.nullcontext()  # no refresh token: nothing to coordinate
        return self._store.exclusive(account)


def _lock_key(account: str) -> int:
    digest = hashlib.sha256(_LOCK_PREFIX + account.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _upsert(dialect_name: str) -> Insert:
    """``INSERT ... ON CONFLICT (account) DO UPDATE`` (same syntax on both dialects)."""
    if dialect_name == "sqlite":
        insert: Any = sqlite.insert(account_credentials)
    elif dialect_name == "postgresql":
        insert = postgresql.insert(account_credentials)
    else:
        raise ValueError(f"unsupported database dialect {dialect_name!r}")
    replaced = [c.name for c in account_credentials.columns if c.name != "account"]
    upsert: Insert = insert.on_conflict_do_update(
        index_elements=["account"], set_={name: insert.excluded[name] for name in replaced}
    )
    return upsert


def _from_row(row: RowMapping) -> StoredCredentials:
    return StoredCredentials(
        account=row["account"],
        credentials=Credentials(
            access_token=row["access_token"],
            account_id=row["account_id"],
            refresh_token=row["refresh_token"],
            id_token=row["id_token"],
        ),
        source_fingerprint=row["source_fingerprint"],
        updated_at=row["updated_at"],
    )

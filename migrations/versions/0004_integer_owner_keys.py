"""item_owners keyed by one integer: the item's 64-bit key mixed with its scope.

A row of 0003's table was a composite text key (scope, 34-character digest) in a rowid table
with a separate primary-key index, so each owner cost two random places in two b-trees. Now
``owner_key`` is a signed 64-bit integer (on SQLite the rowid itself): one b-tree, short keys.
``response_id`` goes: nothing read it.

The rows of 0003 are carried over: an 0003 key was ``<kind>:<hex of a 16-byte digest>``, and
the new item key is the first 8 bytes of that same digest (``provenance.item_key``), mixed with
the scope as ``store.scoped_key`` does. The trigger is recreated for the new table; the keys
already in ``snapshots.item_keys`` are only read on insert, so old rows need no change.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from hashlib import blake2b
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UPSERT = """
    ON CONFLICT (owner_key) DO UPDATE SET
        account = excluded.account,
        created_at = excluded.created_at
"""
SQLITE_TRIGGER = f"""
CREATE TRIGGER snapshots_item_owners AFTER INSERT ON snapshots
WHEN NEW.item_keys IS NOT NULL
BEGIN
    INSERT INTO item_owners (owner_key, account, created_at)
    SELECT value, NEW.account, NEW.created_at
      FROM json_each(NEW.item_keys) WHERE true
    {_UPSERT};
END
"""
POSTGRES_FUNCTION = f"""
CREATE FUNCTION snapshots_item_owners() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO item_owners (owner_key, account, created_at)
    SELECT key::bigint, NEW.account, NEW.created_at
      FROM jsonb_array_elements_text(NEW.item_keys::jsonb) AS key
    {_UPSERT};
    RETURN NULL;
END
$$
"""
POSTGRES_TRIGGER = """
CREATE TRIGGER snapshots_item_owners AFTER INSERT ON snapshots
FOR EACH ROW WHEN (NEW.item_keys IS NOT NULL) EXECUTE FUNCTION snapshots_item_owners()
"""
CARRY_BATCH = 1000


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    _drop_trigger(postgresql)
    op.rename_table("item_owners", "item_owners_0003")
    owners = op.create_table(
        "item_owners",
        sa.Column(
            "owner_key",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column("account", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner_key", name="pk_item_owners_key"),
    )
    for rows in _carried_over():
        op.bulk_insert(owners, rows)
    op.drop_index("ix_item_owners_created_at", table_name="item_owners_0003")
    op.drop_table("item_owners_0003")
    op.create_index("ix_item_owners_created_at", "item_owners", ["created_at"])
    _create_trigger(postgresql)


def downgrade() -> None:
    """Back to 0003's table, empty: its text keys cannot be rebuilt from the integers."""
    postgresql = op.get_bind().dialect.name == "postgresql"
    _drop_trigger(postgresql)
    op.drop_index("ix_item_owners_created_at", table_name="item_owners")
    op.drop_table("item_owners")
    op.create_table(
        "item_owners",
        sa.Column("scope", sa.String(), nullable=False),
        sa.Column("item_key", sa.String(), nullable=False),
        sa.Column("account", sa.String(), nullable=False),
        sa.Column("response_id", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope", "item_key", name="pk_item_owners"),
    )
    op.create_index("ix_item_owners_created_at", "item_owners", ["created_at"])
    script = op.get_context().script
    assert script is not None  # alembic runs migrations from their script directory
    old = script.get_revision("0003").module
    if postgresql:
        op.execute(old.POSTGRES_FUNCTION)
        op.execute(old.POSTGRES_TRIGGER)
    else:
        op.execute(old.SQLITE_TRIGGER)


def _carried_over() -> Iterator[list[dict[str, Any]]]:
    """0003's rows with their new keys, a batch at a time."""
    old = sa.table(
        "item_owners_0003",
        sa.column("scope", sa.String()),
        sa.column("item_key", sa.String()),
        sa.column("account", sa.String()),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    result = op.get_bind().execute(
        sa.select(old.c.scope, old.c.item_key, old.c.account, old.c.created_at)
    )
    while rows := result.fetchmany(CARRY_BATCH):
        yield [
            {"owner_key": key, "account": account, "created_at": created_at}
            for scope, item_key, account, created_at in rows
            if (key := _new_key(scope, item_key)) is not None
        ]


def _new_key(scope: str, old_key: str) -> int | None:
    try:
        item = int.from_bytes(bytes.fromhex(old_key[2:18]), "big", signed=True)
    except ValueError:
        return None
    salt = blake2b(scope.encode(errors="surrogatepass"), digest_size=8).digest()
    return item ^ int.from_bytes(salt, "big", signed=True)


def _drop_trigger(postgresql: bool) -> None:
    op.execute(
        "DROP TRIGGER IF EXISTS snapshots_item_owners" + (" ON snapshots" if postgresql else "")
    )
    if postgresql:
        op.execute("DROP FUNCTION IF EXISTS snapshots_item_owners()")


def _create_trigger(postgresql: bool) -> None:
    if postgresql:
        op.execute(POSTGRES_FUNCTION)
        op.execute(POSTGRES_TRIGGER)
    else:
        op.execute(SQLITE_TRIGGER)

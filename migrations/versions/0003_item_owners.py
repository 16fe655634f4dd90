"""Which account produced each output item (SPEC S3.2, S4): the item_owners table, fed by a
trigger from the item keys each snapshot row carries.

A snapshot row gets ``item_keys``, the JSON array of its output items' keys
(``codexlb.provenance.item_key``); on insert, the database upserts one ``item_owners`` row per
key, in the same statement: the owners commit with their snapshot at the cost of no extra
statement.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UPSERT = """
    ON CONFLICT (scope, item_key) DO UPDATE SET
        account = excluded.account,
        response_id = excluded.response_id,
        created_at = excluded.created_at
"""
SQLITE_TRIGGER = f"""
CREATE TRIGGER snapshots_item_owners AFTER INSERT ON snapshots
WHEN NEW.item_keys IS NOT NULL
BEGIN
    INSERT INTO item_owners (scope, item_key, account, response_id, created_at)
    SELECT NEW.scope, value, NEW.account, NEW.response_id, NEW.created_at
      FROM json_each(NEW.item_keys) WHERE true
    {_UPSERT};
END
"""
POSTGRES_FUNCTION = f"""
CREATE FUNCTION snapshots_item_owners() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO item_owners (scope, item_key, account, response_id, created_at)
    SELECT NEW.scope, key, NEW.account, NEW.response_id, NEW.created_at
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


def upgrade() -> None:
    op.add_column("snapshots", sa.Column("item_keys", sa.Text(), nullable=True))
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
    if op.get_bind().dialect.name == "postgresql":
        op.execute(POSTGRES_FUNCTION)
        op.execute(POSTGRES_TRIGGER)
    else:
        op.execute(SQLITE_TRIGGER)


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.execute(
        "DROP TRIGGER IF EXISTS snapshots_item_owners" + (" ON snapshots" if postgresql else "")
    )
    if postgresql:
        op.execute("DROP FUNCTION IF EXISTS snapshots_item_owners()")
    op.drop_index("ix_item_owners_created_at", table_name="item_owners")
    op.drop_table("item_owners")
    op.drop_column("snapshots", "item_keys")

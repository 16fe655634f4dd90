"""No index by time that only pruning reads: ix_item_owners_created_at, and on SQLite
ix_snapshots_created_at.

Each commit of a snapshot wrote a page of each to the WAL: two of the five pages a lone
snapshot's commit writes. Pruning now finds old snapshots on SQLite in the order they were
stored (``rowid``), and deletes the owners of their items by the keys in their ``item_keys``
(by primary key), unless a later response recorded them again (``created_at``).

Snapshots stored under 0003 still hold 0003's text keys (``<kind>:<hex digest>``) in
``item_keys``; their owners were carried over to integer keys by 0004. They are rewritten here
to those integer keys, as 0004 computed them, so that pruning finds the owners they recorded.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 22:15:00
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REWRITE_BATCH = 1000

_snapshots = sa.table(
    "snapshots",
    sa.column("response_id", sa.String()),
    sa.column("scope", sa.String()),
    sa.column("item_keys", sa.Text()),
)


def upgrade() -> None:
    op.drop_index("ix_item_owners_created_at", table_name="item_owners")
    if op.get_bind().dialect.name == "sqlite":
        op.drop_index("ix_snapshots_created_at", table_name="snapshots")
    _rewrite_text_keys()


def downgrade() -> None:
    """The indexes again; the rewritten keys stay integers, which 0004's trigger reads too."""
    if op.get_bind().dialect.name == "sqlite":
        op.create_index("ix_snapshots_created_at", "snapshots", ["created_at"])
    op.create_index("ix_item_owners_created_at", "item_owners", ["created_at"])


def _rewrite_text_keys() -> None:
    """0003's text keys in ``snapshots.item_keys`` as 0004's integers, a batch at a time.

    Only an array holding a string can hold a 0003 key (0004's are plain numbers)."""
    script = op.get_context().script
    assert script is not None  # alembic runs migrations from their script directory
    new_key = script.get_revision("0004").module._new_key
    connection = op.get_bind()
    after = ""
    while True:
        rows = connection.execute(
            sa.select(_snapshots.c.response_id, _snapshots.c.scope, _snapshots.c.item_keys)
            .where(_snapshots.c.response_id > after, _snapshots.c.item_keys.like('%"%'))
            .order_by(_snapshots.c.response_id)
            .limit(REWRITE_BATCH)
        ).all()
        if not rows:
            return
        updates = []
        for response_id, scope, item_keys in rows:
            keys = [
                key if isinstance(key, int) else new_key(scope, str(key))
                for key in json.loads(item_keys)
            ]
            kept = [key for key in keys if key is not None]
            updates.append({"id": response_id, "keys": json.dumps(kept) if kept else None})
        connection.execute(
            _snapshots.update()
            .where(_snapshots.c.response_id == sa.bindparam("id"))
            .values(item_keys=sa.bindparam("keys")),
            updates,
        )
        after = rows[-1][0]

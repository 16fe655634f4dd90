"""Create the item_owners table: which account produced each output item (SPEC S3.2, S4).

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


def upgrade() -> None:
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


def downgrade() -> None:
    op.drop_index("ix_item_owners_created_at", table_name="item_owners")
    op.drop_table("item_owners")

"""Create the snapshots table.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "snapshots",
        sa.Column("response_id", sa.String(), nullable=False),
        sa.Column("previous_response_id", sa.String(), nullable=True),
        sa.Column("scope", sa.String(), nullable=False),
        sa.Column("account", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=True),
        sa.Column("input_items", sa.Text(), nullable=False),
        sa.Column("output_items", sa.Text(), nullable=False),
        sa.Column("usage", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("response_id", name="pk_snapshots"),
    )
    op.create_index("ix_snapshots_created_at", "snapshots", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_snapshots_created_at", table_name="snapshots")
    op.drop_table("snapshots")

"""Create key_usage: what each client key used, per minute, account and model (SPEC S9).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 13:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    count = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "key_usage",
        sa.Column("client_key", sa.String(), nullable=False),
        sa.Column("minute", count, nullable=False, autoincrement=False),
        sa.Column("account", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("requests", count, nullable=False),
        sa.Column("input_tokens", count, nullable=False),
        sa.Column("cached_input_tokens", count, nullable=False),
        sa.Column("output_tokens", count, nullable=False),
        sa.Column("reasoning_tokens", count, nullable=False),
        sa.PrimaryKeyConstraint("client_key", "minute", "account", "model", name="pk_key_usage"),
    )
    op.create_index("ix_key_usage_minute", "key_usage", ["minute"])


def downgrade() -> None:
    op.drop_index("ix_key_usage_minute", table_name="key_usage")
    op.drop_table("key_usage")

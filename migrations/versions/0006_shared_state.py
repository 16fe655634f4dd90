"""What replicas sharing one PostgreSQL database know together (SPEC S12).

- ``account_knowledge``: per account, what the upstream said about it (cooldowns with their
  reason, usage windows, refused credentials), merged row by row, so a replica that starts
  reads what the others learned.
- ``affinity``: soft affinity slots (``session-id``, ``prompt_cache_key``...) → account.
- ``key_counters``: per-second buckets of counters shared by the replicas (requests per minute
  of a client key), taken through ``codexlb_take`` under a per-counter advisory lock so that
  two replicas never both take the last unit.
- ``replicas``: one row per live replica, its heartbeat and its in-flight leases per account.

The tables exist on SQLite too (one schema), where nothing reads them: one process keeps all
of this in memory.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 14:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POSTGRES_TAKE = """
CREATE FUNCTION codexlb_take(p_counter text, p_window double precision, p_limit integer)
RETURNS TABLE (admitted boolean, used integer, retry_after double precision)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_now double precision := extract(epoch from clock_timestamp());
    v_second bigint := floor(v_now);
    v_span bigint := greatest(ceil(p_window)::bigint, 1);
    v_used integer;
    v_oldest bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('codexlb-counter:' || p_counter, 0));
    DELETE FROM key_counters WHERE counter = p_counter AND second <= v_second - v_span;
    SELECT coalesce(sum(count), 0), min(second) INTO v_used, v_oldest
      FROM key_counters WHERE counter = p_counter;
    IF v_used >= p_limit THEN
        RETURN QUERY SELECT false, v_used, greatest(v_oldest + v_span - v_now, 0.0);
        RETURN;
    END IF;
    INSERT INTO key_counters (counter, second, count) VALUES (p_counter, v_second, 1)
        ON CONFLICT (counter, second) DO UPDATE SET count = key_counters.count + 1;
    RETURN QUERY SELECT true, v_used + 1, 0.0::double precision;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "account_knowledge",
        sa.Column("account", sa.String(), nullable=False),
        sa.Column("identity", sa.String(), nullable=False),
        sa.Column("cooldown_until", sa.Double(), nullable=False),
        sa.Column("rate_limited_until", sa.Double(), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("usage_at", sa.Double(), nullable=False),
        sa.Column("primary_used", sa.Double(), nullable=False),
        sa.Column("primary_resets_at", sa.Double(), nullable=False),
        sa.Column("secondary_used", sa.Double(), nullable=False),
        sa.Column("secondary_resets_at", sa.Double(), nullable=False),
        sa.Column("refused", sa.String(), nullable=True),
        sa.Column("retry_at", sa.Double(), nullable=False),
        sa.Column("refused_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("account", name="pk_account_knowledge"),
    )
    op.create_table(
        "affinity",
        sa.Column("slot", sa.String(), nullable=False),
        sa.Column("account", sa.String(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("slot", name="pk_affinity"),
    )
    op.create_index("ix_affinity_expires_at", "affinity", ["expires_at"])
    op.create_table(
        "key_counters",
        sa.Column("counter", sa.String(), nullable=False),
        sa.Column("second", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("counter", "second", name="pk_key_counters"),
    )
    op.create_table(
        "replicas",
        sa.Column("replica", sa.String(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("inflight", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("replica", name="pk_replicas"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(POSTGRES_TAKE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS codexlb_take(text, double precision, integer)")
    op.drop_table("replicas")
    op.drop_table("key_counters")
    op.drop_index("ix_affinity_expires_at", table_name="affinity")
    op.drop_table("affinity")
    op.drop_table("account_knowledge")

"""partial indexes on open call records

The sweeps that close call records left open (a process killed mid-join, or a
call whose end was never stored) look for open stays and live calls once a
minute on every process; these keep that from scanning whole tables.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_call_sessions_open",
        "call_sessions",
        ["room_id"],
        postgresql_where=sa.text("ended_at IS NULL"),
        sqlite_where=sa.text("ended_at IS NULL"),
    )
    op.create_index(
        "ix_call_participants_open",
        "call_participants",
        ["call_id"],
        postgresql_where=sa.text("left_at IS NULL"),
        sqlite_where=sa.text("left_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_call_participants_open", table_name="call_participants")
    op.drop_index("ix_call_sessions_open", table_name="call_sessions")

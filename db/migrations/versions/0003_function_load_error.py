"""Functions remember their last failed prewarm load, so it is shown and retried with backoff.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite rebuilds the table for these changes: keep 0002's AUTOINCREMENT (ids never reused).
_KEEP_IDS = {"sqlite_autoincrement": True}


def upgrade() -> None:
    """Add functions.load_error, load_failures and load_retry_at."""
    with op.batch_alter_table("functions", table_kwargs=_KEEP_IDS) as batch:
        batch.add_column(sa.Column("load_error", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(
            sa.Column("load_failures", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch.add_column(sa.Column("load_retry_at", sa.Double(), nullable=True))


def downgrade() -> None:
    """Drop the three columns."""
    with op.batch_alter_table("functions", table_kwargs=_KEEP_IDS) as batch:
        for name in ("load_retry_at", "load_failures", "load_error"):
            batch.drop_column(name)

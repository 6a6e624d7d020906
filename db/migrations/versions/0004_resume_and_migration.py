"""Resume after an invoker loss, and live migration: what a function does when its invoker
is lost, the moves an activation made, and a migration asked for.

    functions.on_invoker_loss        "resume" (default) | "fail"
    activations.moves                JSON list of moves (NULL: none)
    activations.migrate_to           an invoker's name, "" for any (NULL: none asked)
    activations.migrate_requested_at epoch seconds

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite rebuilds a table for some changes: keep 0002's AUTOINCREMENT (ids never reused).
_KEEP_IDS = {"sqlite_autoincrement": True}
_ACTIVATION_COLUMNS = ("migrate_requested_at", "migrate_to", "moves")


def upgrade() -> None:
    """Add functions.on_invoker_loss and the activations' moves and migration request."""
    with op.batch_alter_table("functions", table_kwargs=_KEEP_IDS) as batch:
        batch.add_column(
            sa.Column(
                "on_invoker_loss",
                sa.String(length=8),
                server_default=sa.text("'resume'"),
                nullable=False,
            )
        )
    with op.batch_alter_table("activations") as batch:
        batch.add_column(sa.Column("moves", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("migrate_to", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("migrate_requested_at", sa.Double(), nullable=True))


def downgrade() -> None:
    """Drop the four columns."""
    with op.batch_alter_table("activations") as batch:
        for name in _ACTIVATION_COLUMNS:
            batch.drop_column(name)
    with op.batch_alter_table("functions", table_kwargs=_KEEP_IDS) as batch:
        batch.drop_column("on_invoker_loss")

"""Resume after an invoker loss, and live migration: what a function does when its invoker
is lost, the moves an activation made, and a migration asked for.

    functions.on_invoker_loss        "resume" (default) | "fail"
    activations.moves                JSON list of moves (NULL: none)
    migration_requests               a live migration asked for, until the controller
                                     process relaying the activation takes it (a running
                                     stream's activation has no row of its own yet)

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


def upgrade() -> None:
    """Add functions.on_invoker_loss, activations.moves and migration_requests."""
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
    op.create_table(
        "migration_requests",
        sa.Column("activation_id", sa.String(length=32), primary_key=True),
        sa.Column(
            "namespace_id",
            sa.Integer(),
            sa.ForeignKey("namespaces.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("to_invoker", sa.String(length=128), nullable=True),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("requested_at", sa.Double(), nullable=False),
    )


def downgrade() -> None:
    """Drop the table and the two columns."""
    op.drop_table("migration_requests")
    with op.batch_alter_table("activations") as batch:
        batch.drop_column("moves")
    with op.batch_alter_table("functions", table_kwargs=_KEEP_IDS) as batch:
        batch.drop_column("on_invoker_loss")

"""SQLite: namespace and function ids are never reused (AUTOINCREMENT), as on PostgreSQL.

Without AUTOINCREMENT SQLite gives a new row the largest id plus one, so a
namespace or function deleted last and made again gets its old id back; the
controller's caches name both by id. PostgreSQL sequences never reuse an id:
nothing changes there.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("namespaces", "functions")


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in _TABLES:  # the copy keeps every id; AUTOINCREMENT then starts past the largest
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass


def upgrade() -> None:
    """Rebuild the two tables with AUTOINCREMENT on SQLite."""
    _rebuild(True)


def downgrade() -> None:
    """Rebuild them without it."""
    _rebuild(False)

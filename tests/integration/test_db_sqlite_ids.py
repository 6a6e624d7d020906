"""On SQLite, ids are never reused at the head revision (every later migration keeps 0002)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sllm.db import Database


@pytest.mark.parametrize("table", ["namespaces", "functions"])
def test_sqlite_tables_keep_autoincrement_at_head(tmp_path: Path, table: str) -> None:
    path = tmp_path / "ids.db"
    db = Database(f"sqlite:///{path}")
    try:
        db.upgrade()
    finally:
        db.dispose()
    with sqlite3.connect(path) as conn:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    assert "AUTOINCREMENT" in sql, sql

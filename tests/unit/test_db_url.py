"""database_url and Database.url: which database a controller uses and how it is shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm.db import Database, database_url


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLLM_HOME": "/srv/sllm"}, "sqlite:////srv/sllm/sllm.db"),
        ({"SLLM_DATABASE_URL": "", "SLLM_HOME": "/srv/sllm"}, "sqlite:////srv/sllm/sllm.db"),
        ({"SLLM_DATABASE_URL": "sqlite:////data/x.db"}, "sqlite:////data/x.db"),
        (
            {"SLLM_DATABASE_URL": "postgres://u:p@db:5432/sllm"},
            "postgresql+psycopg://u:p@db:5432/sllm",
        ),
        ({"SLLM_DATABASE_URL": "postgresql://db/sllm"}, "postgresql+psycopg://db/sllm"),
        ({"SLLM_DATABASE_URL": "postgresql+psycopg://db/sllm"}, "postgresql+psycopg://db/sllm"),
        (
            {"SLLM_DATABASE_URL": "PostgreSQL://db/sllm?sslmode=require"},
            "postgresql+psycopg://db/sllm?sslmode=require",
        ),
    ],
    ids=["default", "empty", "sqlite", "postgres", "postgresql", "psycopg", "case-and-query"],
)
def test_database_url(env: dict[str, str], expected: str) -> None:
    assert database_url(env) == expected


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:hunter2@db/sllm",
        "postgresql+psycopg2://u:hunter2@db/sllm",
        "u:hunter2@db/sllm",
        "file:///tmp/x.db",
    ],
    ids=["mysql", "other-driver", "no-scheme", "file"],
)
def test_database_url_rejects_other_schemes_naming_the_variable(url: str) -> None:
    with pytest.raises(ValueError, match="SLLM_DATABASE_URL") as info:
        database_url({"SLLM_DATABASE_URL": url})
    assert "hunter2" not in str(info.value)


def test_database_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="unsupported database scheme 'mysql'"):
        Database("mysql://db/sllm")


def test_database_url_hides_the_password() -> None:
    # Creating the engine connects to nothing.
    db = Database("postgres://sllm:s3cret@db.example:5432/sllm")
    assert db.url == "postgresql+psycopg://sllm:***@db.example:5432/sllm"
    assert db.dialect == "postgresql"
    db.dispose()


def test_sqlite_database_creates_its_folder(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/state/db/sllm.db")
    assert (tmp_path / "state" / "db").is_dir()
    assert db.dialect == "sqlite"
    db.dispose()

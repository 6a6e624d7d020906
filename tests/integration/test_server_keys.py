"""The embedded server's admin key: reused across starts, rotated on request, kept private."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from sllm.cli import main
from sllm.controller import Controller, ControllerConfig
from sllm.core.errors import Unauthorized
from sllm.db import Database
from sllm.server import ServerSettings, prepare
from sllm.server_secrets import key_path


def _valid(settings: ServerSettings, key: str) -> bool:
    db = Database(settings.database_url)
    controller = Controller(
        ControllerConfig(database_url=settings.database_url, internal_token="t"), db
    )
    try:
        controller.authenticate(key)
        return True
    except Unauthorized:
        return False
    finally:
        controller.close()
        db.dispose()


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(tmp_path / "data")


def test_every_start_reuses_the_saved_key(settings: ServerSettings) -> None:
    first = prepare(settings)
    second = prepare(settings)

    assert second == first
    assert _valid(settings, first)
    assert key_path(settings.data_dir).read_text().strip() == first


def test_a_new_key_revokes_the_previous_one(settings: ServerSettings) -> None:
    old = prepare(settings)

    new = prepare(settings, new_key=True)

    assert new != old
    assert _valid(settings, new) and not _valid(settings, old)
    assert prepare(settings) == new


def test_a_given_key_replaces_the_saved_one(settings: ServerSettings) -> None:
    old = prepare(settings)
    given = "given:s3cr3t-value"

    key = prepare(ServerSettings(settings.data_dir, api_key=given))

    assert key == given
    assert _valid(settings, given) and not _valid(settings, old)
    assert prepare(settings) == given


def test_a_revoked_saved_key_is_replaced(settings: ServerSettings) -> None:
    old = prepare(settings)
    db = Database(settings.database_url)
    controller = Controller(ControllerConfig(database_url=settings.database_url), db)
    try:
        controller.revoke_key("default", old.partition(":")[0])
    finally:
        controller.close()
        db.dispose()

    new = prepare(settings)

    assert new != old and _valid(settings, new) and not _valid(settings, old)


def test_a_saved_key_survives_a_database_made_afresh(settings: ServerSettings) -> None:
    key = prepare(settings)
    (settings.data_dir / "sllm.db").unlink()

    assert prepare(settings) == key
    assert _valid(settings, key)


def test_the_data_folder_and_its_files_are_private(settings: ServerSettings) -> None:
    settings.data_dir.mkdir(mode=0o755)
    (settings.data_dir / "server.log").write_text("from an older version")
    (settings.data_dir / "server.log").chmod(0o644)

    prepare(settings)

    assert stat.S_IMODE(settings.data_dir.stat().st_mode) == 0o700
    for name in ("admin.key", "sllm.db", "server.log"):
        mode = stat.S_IMODE((settings.data_dir / name).stat().st_mode)
        assert mode & 0o077 == 0, (name, oct(mode))


def test_a_revoked_key_is_not_given_back(settings: ServerSettings) -> None:
    old = prepare(settings)
    prepare(settings, new_key=True)  # `old` is revoked

    with pytest.raises(RuntimeError, match="was revoked; give another key, or use --new-key"):
        prepare(ServerSettings(settings.data_dir, api_key=old))

    assert not _valid(settings, old)


def test_a_mangled_saved_key_is_treated_as_absent(settings: ServerSettings) -> None:
    """Regression: a saved key with an invalid key id failed every start with a traceback."""
    prepare(settings)
    key_path(settings.data_dir).write_text("bad id:secret\n")  # a space is no key id character

    key = prepare(settings)

    assert key.partition(":")[0] != "bad id" and _valid(settings, key)
    assert key_path(settings.data_dir).read_text().strip() == key


def test_a_given_key_with_an_invalid_key_id_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["server", "start", "--data-dir", str(tmp_path / "data"), "--api-key", "bad id:secret"],
        catch_exceptions=False,
    )

    assert result.exit_code == 2, result.output
    assert "KEY_ID 1-32 printable ASCII characters other than ':'" in result.output
    assert not (tmp_path / "data").exists()  # refused before anything was made

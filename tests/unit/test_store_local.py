"""LocalStore specifics: atomic writes, hidden temporaries, folder/object clashes, tidy deletes.

The behaviour both backends share is in tests/integration/test_store.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sllm.core.errors import InvalidRequest, StoreError
from sllm.store import LocalStore, open_store


def test_local_store_writes_are_atomic_and_temp_files_stay_hidden(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_bytes("m/obj", b"old")
    stray = tmp_path / "s" / "m" / ".obj.tmp-0123456789ab"
    stray.write_bytes(b"half written")  # what a crash mid-write leaves behind

    assert [i.key for i in store.list("")] == ["m/obj"]
    assert store.get_bytes("m/obj") == b"old"
    with pytest.raises(InvalidRequest):
        store.put_bytes("m/.obj.tmp-0123456789ab", b"x")


def test_local_store_refuses_a_key_that_is_also_a_folder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_bytes("a/b", b"x")
    with pytest.raises(StoreError, match="share a name"):
        store.put_bytes("a", b"y")
    with pytest.raises(StoreError, match="share a name"):
        store.put_bytes("a/b/c", b"z")


def test_local_store_delete_prunes_empty_folders(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_bytes("a/b/c", b"x")
    store.delete("a/b/c")
    assert list((tmp_path / "s").iterdir()) == []


def test_a_failed_write_leaves_the_old_object_and_no_temporary(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_bytes("m/obj", b"old")
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100)

    def boom(n: int) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        store.put_file("m/obj", src, progress=boom)

    assert store.get_bytes("m/obj") == b"old"
    assert os.listdir(tmp_path / "s" / "m") == ["obj"]


def test_uri_round_trips_through_a_path_with_spaces(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "my store")
    assert store.uri.startswith("file:///") and "%20" in store.uri
    store.put_bytes("k", b"v")
    assert open_store(store.uri).get_bytes("k") == b"v"


def test_range_into_a_read_only_view_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_bytes("k", b"abcdef")
    with pytest.raises(InvalidRequest, match="writable"):
        store.get_range_into("k", 0, memoryview(b"xx"))

"""Published-model records: name rules, published.json validation, the content digest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sllm.core.errors import CorruptObject, InvalidRequest
from sllm.native_loader import save_state_dict
from sllm.store import PublishedModel, validate_model_name
from sllm.store._push import checkpoint_files, content_digest

DIGEST = "ab" * 32


def record(**change: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "llama",
        "digest": DIGEST,
        "total_bytes": 4196,
        "files": [{"path": "data.0", "size": 4096}, {"path": "manifest.json", "size": 100}],
        "format_version": 1,
        "pushed_at": "2024-05-01T12:00:00Z",
    }
    return doc | change


@pytest.mark.parametrize(
    "name",
    ["", "-lead", "trail-", ".hidden", "a..b", "a/b", "a b", "x" * 129, "ünï", "a\\b", "../x"],
    ids=[
        "empty",
        "lead",
        "trail",
        "dot",
        "dotdot",
        "slash",
        "space",
        "long",
        "unicode",
        "backslash",
        "escape",
    ],
)
def test_invalid_names_are_rejected_with_the_rule(name: str) -> None:
    with pytest.raises(InvalidRequest, match="1-128 characters"):
        validate_model_name(name)


@pytest.mark.parametrize("name", ["a", "Llama-3.1-8B", "qwen2.5_0.5b", "x" * 128])
def test_valid_names(name: str) -> None:
    assert validate_model_name(name) == name


def test_record_round_trips() -> None:
    model = PublishedModel.from_json(record())
    assert model.to_json() == record()
    assert model.prefix == f"models/llama/{DIGEST}/"
    assert model.key("data.0") == f"models/llama/{DIGEST}/data.0"
    assert [(f.path, f.size) for f in model.files] == [("data.0", 4096), ("manifest.json", 100)]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "not a JSON object"),
        (record(name="a/b"), "invalid model name"),
        (record(digest="abc"), "sha256"),
        (record(digest="AB" * 32), "sha256"),
        (record(total_bytes=1), "total_bytes"),
        (record(total_bytes=True), "total_bytes"),
        (record(files=[]), "non-empty"),
        (record(files=[{"path": "data.0", "size": 4196}]), "manifest.json"),
        (
            record(files=[{"path": "../x", "size": 0}, {"path": "manifest.json", "size": 4196}]),
            "key",
        ),
        (record(files=[{"path": "manifest.json", "size": -1}]), "size"),
        (record(files=["manifest.json"]), "not an object"),
        (record(format_version="1"), "format_version"),
        (record(pushed_at=None), "pushed_at"),
    ],
    ids=[
        "not-object",
        "name",
        "digest-short",
        "digest-upper",
        "total",
        "total-bool",
        "no-files",
        "no-manifest",
        "escape",
        "negative",
        "file-not-object",
        "version",
        "pushed-at",
    ],
)
def test_malformed_records_are_corrupt_objects(doc: Any, message: str) -> None:
    with pytest.raises(CorruptObject, match=message):
        PublishedModel.from_json(doc)


def _checkpoint(folder: Path, value: float) -> Path:
    import torch

    save_state_dict({"w": torch.full((4, 4), value)}, folder, chunk_size=4096)
    return folder


def test_digest_depends_on_content_only(tmp_path: Path) -> None:
    from sllm.native_loader import read_manifest

    def digest(folder: Path) -> str:
        return content_digest(checkpoint_files(folder, read_manifest(folder)))

    a = digest(_checkpoint(tmp_path / "a", 1.0))
    b = digest(_checkpoint(tmp_path / "elsewhere" / "b", 1.0))
    c = digest(_checkpoint(tmp_path / "c", 2.0))

    assert a == b  # same bytes in another folder: same digest
    assert a != c
    assert len(a) == 64 and int(a, 16) >= 0


def test_an_incomplete_checkpoint_cannot_be_published(tmp_path: Path) -> None:
    from sllm.native_loader import read_manifest

    folder = _checkpoint(tmp_path / "a", 1.0)
    manifest = read_manifest(folder)
    (folder / "data.0").unlink()
    with pytest.raises(InvalidRequest, match=r"data\.0 is missing"):
        checkpoint_files(folder, manifest)

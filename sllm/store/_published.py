"""Published models in a store: the versioned layout, its pointer record, and reading it.

    models/{name}/{digest}/manifest.json, data.0, ..., config.json, tokenizer files
    models/{name}/published.json      the pointer: which digest is live (written last)

A digest folder is content-addressed and never modified once its pointer is written;
publishing new content writes a new digest folder, then flips the pointer, so a reader
following the pointer never sees a half-written model.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from sllm.core.errors import CorruptObject, InvalidRequest, NotFound
from sllm.core.names import MODEL_NAME_RULE, is_model_name

from ._base import Store, check_key

MODELS = "models/"
POINTER = "published.json"
MANIFEST = "manifest.json"
_DIGEST = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger(__name__)


def validate_model_name(name: str) -> str:
    """Return `name` if it is a valid model name, else raise InvalidRequest stating the rule."""
    if not is_model_name(name):
        raise InvalidRequest(f"invalid model name {name!r}: a model name is {MODEL_NAME_RULE}")
    return name


def pointer_key(name: str) -> str:
    """The key of `name`'s published.json."""
    return f"{MODELS}{validate_model_name(name)}/{POINTER}"


@dataclass(frozen=True)
class PublishedFile:
    """One file of a published model: its path relative to the model folder, and its size."""

    path: str
    size: int


@dataclass(frozen=True)
class PublishedModel:
    """What published.json says: the live digest of a model and the files under it."""

    name: str
    digest: str
    total_bytes: int
    files: tuple[PublishedFile, ...]
    format_version: int
    pushed_at: str

    @property
    def prefix(self) -> str:
        """The key prefix of this version's files: models/{name}/{digest}/."""
        return f"{MODELS}{self.name}/{self.digest}/"

    def key(self, path: str) -> str:
        """The store key of one of this model's files."""
        return self.prefix + path

    def to_json(self) -> dict[str, Any]:
        """The published.json document."""
        return {
            "name": self.name,
            "digest": self.digest,
            "total_bytes": self.total_bytes,
            "files": [{"path": f.path, "size": f.size} for f in self.files],
            "format_version": self.format_version,
            "pushed_at": self.pushed_at,
        }

    @classmethod
    def from_json(cls, doc: Any) -> PublishedModel:
        """Validate a parsed published.json; CorruptObject names what is wrong."""
        if not isinstance(doc, dict):
            raise CorruptObject("published.json is not a JSON object")
        name: Any = doc.get("name")
        try:
            validate_model_name(name)
        except InvalidRequest as exc:
            raise CorruptObject(f"published.json: {exc}") from None
        digest: Any = doc.get("digest")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise CorruptObject(f"published.json of {name!r}: digest {digest!r} is not sha256 hex")
        raw_files: Any = doc.get("files")
        if not isinstance(raw_files, list) or not raw_files:
            raise CorruptObject(f"published.json of {name!r}: 'files' must be a non-empty list")
        files = tuple(_file(name, f) for f in raw_files)
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths) or MANIFEST not in paths:
            raise CorruptObject(
                f"published.json of {name!r}: files must be unique and include {MANIFEST}"
            )
        total: Any = doc.get("total_bytes")
        if not _is_int(total) or total != sum(f.size for f in files):
            raise CorruptObject(
                f"published.json of {name!r}: total_bytes {total!r} is not the sum of file sizes"
            )
        version: Any = doc.get("format_version")
        pushed_at: Any = doc.get("pushed_at")
        if not _is_int(version) or not isinstance(pushed_at, str):
            raise CorruptObject(
                f"published.json of {name!r}: needs an integer format_version and pushed_at"
            )
        return cls(name, digest, total, files, version, pushed_at)


def read_published(store: Store, name: str) -> PublishedModel:
    """The live version of `name`; NotFound if it was never published, CorruptObject if mangled."""
    key = pointer_key(name)
    try:
        raw = store.get_bytes(key)
    except NotFound:
        raise NotFound(f"model {name!r} is not published in {store.uri}") from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptObject(f"{store.uri}/{key}: not valid JSON: {exc}") from exc
    model = PublishedModel.from_json(doc)
    if model.name != name:
        raise CorruptObject(f"{store.uri}/{key}: names model {model.name!r}, not {name!r}")
    return model


def list_models(store: Store) -> list[PublishedModel]:
    """Every published model in `store`, sorted by name (mangled pointers are logged, skipped)."""
    models = []
    for info in store.list(MODELS):
        parts = info.key.split("/")
        if len(parts) != 3 or parts[2] != POINTER:
            continue
        try:
            models.append(read_published(store, parts[1]))
        except InvalidRequest:
            continue  # a folder name that is not a model name: not ours
        except NotFound:
            continue  # deleted while we listed
        except CorruptObject as exc:
            log.warning("skipping %s: %s", info.key, exc)
    return sorted(models, key=lambda m: m.name)


def _file(name: str, doc: Any) -> PublishedFile:
    if not isinstance(doc, dict):
        raise CorruptObject(f"published.json of {name!r}: a file entry is not an object")
    path: Any = doc.get("path")
    size: Any = doc.get("size")
    try:
        check_key(path)
    except InvalidRequest as exc:
        raise CorruptObject(f"published.json of {name!r}: {exc}") from None
    if not _is_int(size) or size < 0:
        raise CorruptObject(f"published.json of {name!r}: file {path!r} has size {size!r}")
    return PublishedFile(path, size)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

"""`push_model`: publish a checkpoint under a name, content-addressed and atomically.

Steps, each safe to interrupt:

1. resolve the source to a converted folder (convert or download first when needed);
2. digest = sha256 over, for every file in sorted path order, `path NUL size NUL bytes`;
3. if published.json already names that digest, stop: nothing is written;
4. upload the files missing under models/{name}/{digest}/ (data first, manifest.json last);
5. write models/{name}/published.json, the only step that makes the new version visible.

An interrupted push leaves at most an unreferenced digest folder; the next push of the
same content finds those files and uploads only the rest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from sllm.core.errors import CorruptObject, InvalidRequest, NotFound
from sllm.core.files import escaping_link

from ._base import Store, check_key
from ._published import (
    MANIFEST,
    PublishedFile,
    PublishedModel,
    pointer_key,
    read_published,
    validate_model_name,
)
from ._source import converted_folder

if TYPE_CHECKING:
    from sllm.native_loader import Manifest

HASH_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class PushResult:
    """The model as published; whether bytes were uploaded; `unchanged` if nothing was written."""

    model: PublishedModel
    uploaded: bool
    bytes_uploaded: int
    unchanged: bool = False


@dataclass(frozen=True)
class _LocalFile:
    rel: str
    path: Path
    size: int


def push_model(
    src: str,
    name: str,
    store: Store,
    *,
    progress: bool = True,
    device_map: Any = None,
    chunk_size: int | None = None,
    workdir: Path | None = None,
) -> PushResult:
    """Publish `src` (converted folder, HF folder, .safetensors or hub id) as model `name`."""
    from sllm.native_loader import LoaderError, read_manifest

    validate_model_name(name)
    with converted_folder(
        str(src), progress=progress, device_map=device_map, chunk_size=chunk_size, workdir=workdir
    ) as folder:
        try:
            manifest = read_manifest(folder)
        except LoaderError as exc:
            raise InvalidRequest(f"{src}: not a valid converted checkpoint: {exc}") from exc
        files = checkpoint_files(folder, manifest)
        digest = content_digest(files, progress=progress)
        current = _current(store, name)
        if current is not None and current.digest == digest:
            return PushResult(current, uploaded=False, bytes_uploaded=0, unchanged=True)
        model = PublishedModel(
            name=name,
            digest=digest,
            total_bytes=sum(f.size for f in files),
            files=tuple(PublishedFile(f.rel, f.size) for f in files),
            format_version=manifest.version,
            pushed_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        missing = _missing(store, model, files)
        sent = _upload(store, model, missing, progress=progress)
        store.put_bytes(pointer_key(name), json.dumps(model.to_json(), indent=1).encode())
        return PushResult(model, uploaded=bool(missing), bytes_uploaded=sent)


def checkpoint_files(folder: Path, manifest: Manifest) -> list[_LocalFile]:
    """The files a checkpoint consists of (manifest, partitions, extras), sorted by path."""
    rels = sorted({MANIFEST, *(p.file for p in manifest.partitions), *manifest.files})
    expected = {p.file: p.nbytes for p in manifest.partitions}
    out = []
    for rel in rels:
        try:
            check_key(rel)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{folder}: file {rel!r} cannot be published: {exc}") from None
        path = folder.joinpath(*rel.split("/"))
        problem = escaping_link(folder, path)
        if problem is not None:
            raise InvalidRequest(problem)
        if not path.is_file():
            raise InvalidRequest(f"{folder}: {rel} is missing; the checkpoint is incomplete")
        size = path.stat().st_size
        if rel in expected and size != expected[rel]:
            raise InvalidRequest(
                f"{folder}: {rel} is {size} bytes but the manifest says {expected[rel]}"
            )
        out.append(_LocalFile(rel, path, size))
    return out


def content_digest(files: list[_LocalFile], *, progress: bool = False) -> str:
    """sha256 hex over `path NUL size NUL bytes` of every file, in the given (sorted) order."""
    h = hashlib.sha256()
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    total = sum(f.size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="digest", disable=not progress) as bar:
        for f in files:
            h.update(f"{f.rel}\0{f.size}\0".encode())
            seen = 0
            with open(f.path, "rb") as src:
                while n := src.readinto(buf):
                    h.update(view[:n])
                    seen += n
                    bar.update(n)
            if seen != f.size:
                raise InvalidRequest(f"{f.path} changed while it was being read")
    return h.hexdigest()


def _current(store: Store, name: str) -> PublishedModel | None:
    try:
        return read_published(store, name)
    except NotFound:
        return None
    except CorruptObject:
        return None  # a mangled pointer is replaced by this push


def _missing(store: Store, model: PublishedModel, files: list[_LocalFile]) -> list[_LocalFile]:
    """Files not yet under the digest prefix (left over by an interrupted push, or absent)."""
    present = {info.key: info.size for info in store.list(model.prefix)}
    missing = [f for f in files if present.get(model.key(f.rel)) != f.size]
    # manifest.json goes last so a digest folder with a manifest has all its data.
    return sorted(missing, key=lambda f: (f.rel == MANIFEST, not f.rel.startswith("data."), f.rel))


def _upload(store: Store, model: PublishedModel, files: list[_LocalFile], *, progress: bool) -> int:
    total = sum(f.size for f in files)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"push {model.name}", disable=not progress
    ) as bar:

        def update(n: int) -> None:
            bar.update(n)

        for f in files:
            store.put_file(model.key(f.rel), f.path, progress=update)
    return total

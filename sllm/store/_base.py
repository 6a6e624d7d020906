"""What every object store offers: the `Store` protocol, `ObjectInfo` and key rules.

Keys are '/'-separated paths relative to the store's root (a folder, or a bucket plus an
optional prefix). The same rules apply to every backend, so a key that works on the local
folder store works on S3 and can never name anything outside the store's root.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from sllm.core.errors import InvalidRequest, NotFound, StoreError

MAX_KEY_LENGTH = 1024
# LocalStore writes `.<name>.tmp-<12 hex>` beside the final file; keys may not look like one,
# so a listing can skip them without ever hiding a real object.
TEMP_NAME = re.compile(r"\..*\.tmp-[0-9a-f]{12}")


class ShortObject(StoreError):
    """The object ends before the requested range does.

    The store cannot tell why; a caller that took the range from what was
    published about the object knows it is corrupt, and says so (CorruptObject).
    """


@dataclass(frozen=True)
class ObjectInfo:
    """One object in a store: its key, size in bytes and an entity tag when the backend has one."""

    key: str
    size: int
    etag: str | None


@runtime_checkable
class Store(Protocol):
    """A flat namespace of immutable-by-convention objects addressed by '/'-separated keys."""

    uri: str

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's size and etag, or None when it does not exist."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """The whole object; NotFound when it does not exist."""
        ...

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`; ShortObject when the object is shorter."""
        ...

    def get_range_into(self, key: str, offset: int, view: memoryview) -> None:
        """Fill all of `view` with the object's bytes from `offset`; ShortObject if it ends first."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None:
        """Create or replace the object atomically."""
        ...

    def put_file(
        self, key: str, path: Path, *, progress: Callable[[int], None] | None = None
    ) -> None:
        """Upload a local file as the object; `progress(n)` after each block of n bytes."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, recursively, in key order."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""
        ...


def check_key(key: str) -> str:
    """Return `key` if it is a valid relative object key, else raise InvalidRequest."""
    if not isinstance(key, str) or not key:
        raise InvalidRequest(f"object key must be a non-empty string, got {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(f"object key is longer than {MAX_KEY_LENGTH} characters")
    if "\\" in key or "\x00" in key:
        raise InvalidRequest(f"object key {key!r} contains a backslash or NUL character")
    if key.startswith("/"):
        raise InvalidRequest(f"object key {key!r} must be relative (no leading '/')")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidRequest(
                f"object key {key!r} has an empty, '.' or '..' segment; "
                "keys are '/'-separated names that stay inside the store"
            )
        if TEMP_NAME.fullmatch(segment):
            raise InvalidRequest(f"object key {key!r} looks like a temporary file name")
    return key


def check_prefix(prefix: str) -> str:
    """Return `prefix` if it is '' or the start of a valid key, else raise InvalidRequest."""
    if prefix == "":
        return prefix
    if not isinstance(prefix, str):
        raise InvalidRequest(f"list prefix must be a string, got {prefix!r}")
    # A prefix may end in '/' ("models/") or in the middle of a name ("models/ab").
    check_key(prefix[:-1] if prefix.endswith("/") and len(prefix) > 1 else prefix)
    return prefix


def check_range(offset: int, length: int) -> None:
    """Reject a negative offset or length with InvalidRequest."""
    if offset < 0 or length < 0:
        raise InvalidRequest(f"invalid byte range: offset={offset} length={length}")


def range_target(view: memoryview, offset: int) -> memoryview:
    """`view` as writable flat bytes for a ranged read at `offset` (InvalidRequest otherwise)."""
    target = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    check_range(offset, target.nbytes)
    if target.readonly:
        raise InvalidRequest("get_range_into needs a writable buffer")
    return target


class RangeReads:
    """`get_range` for a store that implements `get_range_into`."""

    def get_range_into(self, key: str, offset: int, view: memoryview) -> None:
        """Fill all of `view` from `offset` of object `key`."""
        raise NotImplementedError

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`; ShortObject when the object is shorter."""
        check_range(offset, length)
        buf = bytearray(length)
        self.get_range_into(key, offset, memoryview(buf))
        return bytes(buf)


def open_upload(path: Path) -> io.BufferedReader:
    """The local file to upload, opened for reading (NotFound / StoreError otherwise)."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file to upload") from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the file to upload: {exc}") from exc

"""`LocalStore`: objects are files under one folder (the embedded deployment's object store).

Writes go to a temporary file in the destination folder, are fsynced and then renamed over
the final name, so a reader sees either the old object or the new one, never a torn write.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from sllm.core.errors import NotFound, StoreError
from sllm.core.files import fsync_dir

from ._base import (
    TEMP_NAME,
    ObjectInfo,
    RangeReads,
    ShortObject,
    check_key,
    check_prefix,
    open_upload,
    range_target,
)

COPY_BLOCK = 8 * 1024 * 1024
_MKDIR_ATTEMPTS = 3


class LocalStore(RangeReads):
    """A `Store` backed by a local folder; thread-safe (every call opens its own file)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(root))
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store folder {self.root}: {exc}") from exc
        self.uri = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's size and etag (mtime and size), or None when it does not exist."""
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"{self.uri}: cannot stat {key!r}: {exc}") from exc
        if not path.is_file():
            return None
        return ObjectInfo(key, st.st_size, _etag(st))

    def get_bytes(self, key: str) -> bytes:
        """The whole object; NotFound when it does not exist."""
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{self.uri}: no object {key!r}") from None
        except OSError as exc:
            raise StoreError(f"{self.uri}: cannot read {key!r}: {exc}") from exc

    def get_range_into(self, key: str, offset: int, view: memoryview) -> None:
        """Fill all of `view` from `offset` with preadv, straight into the caller's memory."""
        target = range_target(view, offset)
        fd = self._open_read(key)
        try:
            done = 0
            while done < target.nbytes:
                n = _pread_into(fd, target[done:], offset + done)
                if n == 0:
                    size = os.fstat(fd).st_size
                    raise ShortObject(
                        f"{self.uri}: {key!r} is {size} bytes; the range "
                        f"[{offset}, {offset + target.nbytes}) runs past its end"
                    )
                done += n
        except OSError as exc:
            raise StoreError(f"{self.uri}: cannot read {key!r}: {exc}") from exc
        finally:
            os.close(fd)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Create or replace the object atomically."""
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(
        self, key: str, path: Path, *, progress: Callable[[int], None] | None = None
    ) -> None:
        """Copy a local file in as the object, atomically; `progress(n)` after each block."""
        src = open_upload(path)

        def copy(dst: BinaryIO) -> None:
            buf = bytearray(COPY_BLOCK)
            view = memoryview(buf)
            while n := src.readinto(buf):
                dst.write(view[:n])
                if progress is not None:
                    progress(n)

        with src:
            self._atomic_write(key, copy)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, recursively, in key order."""
        check_prefix(prefix)
        base_key = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*base_key.split("/")) if base_key else self.root
        found: list[ObjectInfo] = []
        for folder, dirs, files in os.walk(base):
            dirs.sort()
            for name in files:
                if TEMP_NAME.fullmatch(name):
                    continue
                full = os.path.join(folder, name)
                key = Path(full).relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue  # deleted while we walked
                found.append(ObjectInfo(key, st.st_size, _etag(st)))
        yield from sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        """Remove the object (and folders it leaves empty); a missing object is not an error."""
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StoreError(f"{self.uri}: cannot delete {key!r}: {exc}") from exc
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break  # not empty, or a writer just used it
            parent = parent.parent

    def _open_read(self, key: str) -> int:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{self.uri}: no object {key!r}") from None
        except OSError as exc:
            raise StoreError(f"{self.uri}: cannot open {key!r}: {exc}") from exc
        return fd

    def _atomic_write(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        path = self._path(key)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            for attempt in range(_MKDIR_ATTEMPTS):
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    f = open(tmp, "xb")  # noqa: SIM115 - closed below
                    break
                except FileNotFoundError:
                    # A concurrent delete pruned the (then empty) folder; make it again.
                    if attempt == _MKDIR_ATTEMPTS - 1:
                        raise
            try:
                with f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(path.parent)
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
            raise StoreError(
                f"{self.uri}: cannot write {key!r}: a folder and an object would share a name"
            ) from exc
        except OSError as exc:
            raise StoreError(f"{self.uri}: cannot write {key!r}: {exc}") from exc


def _etag(st: os.stat_result) -> str:
    # Not a content hash (that would mean reading the file): every write renames a new file
    # into place, so inode, mtime and size together change whenever an object is rewritten,
    # which is what callers use an etag for.
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.readv(fd, [view])

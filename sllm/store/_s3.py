"""`S3Store`: objects in a bucket (and optional key prefix) of any S3-compatible server.

Built on the `minio` client over one shared urllib3 pool, so one store serves many threads
doing parallel ranged GETs. minio and urllib3 errors are translated here and nowhere else:
NoSuchKey -> NotFound, anything else -> StoreError naming the endpoint. Reads are
idempotent, so a GET that fails on the connection is retried a few times (resuming where a
partial read stopped); writes are not retried here beyond urllib3's connect retries.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from urllib3 import BaseHTTPResponse
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ProtocolError

from sllm.core.errors import InvalidRequest, NotFound, StoreError

from ._base import (
    ObjectInfo,
    RangeReads,
    ShortObject,
    check_key,
    check_prefix,
    open_upload,
    range_target,
)
from ._settings import StoreSettings

T = TypeVar("T")

GET_ATTEMPTS = 3
RETRY_DELAY_S = 0.1
READ_BLOCK = 1024 * 1024  # bounds the temporary copy when urllib3 reads for us
POOL_SIZE = 64  # connections per host: enough for the invoker's parallel ranged GETs
_MISSING = ("NoSuchKey", "NoSuchObject", "ResourceNotFound")
# S3 bucket naming rules (lowercase, 3-63 chars, no leading/trailing '.'/'-').
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def check_bucket(bucket: str) -> str:
    """Return `bucket` if it is a valid S3 bucket name, else raise InvalidRequest."""
    if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidRequest(
            f"{bucket!r} is not a valid bucket name (3-63 characters: lowercase letters, "
            "digits, '.' and '-'; starting and ending with a letter or digit)"
        )
    return bucket


class S3Store(RangeReads):
    """A `Store` in bucket `bucket` under key prefix `prefix` ('' for the whole bucket)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        settings: StoreSettings,
        *,
        create_bucket: bool = True,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
    ) -> None:
        settings.validate()
        if settings.endpoint is None:
            raise InvalidRequest(
                "s3:// stores need an endpoint: set SLLM_S3_ENDPOINT (host:port or URL)"
            )
        check_bucket(bucket)
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.settings = settings
        self.endpoint = settings.endpoint
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            maxsize=POOL_SIZE,
            # Connect errors and throttling/5xx answers are retried briefly by urllib3;
            # errors in the middle of a body are handled by our GET retries.
            retries=urllib3.Retry(
                total=2, read=0, backoff_factor=0.05, status_forcelist=(500, 502, 503, 504)
            ),
        )
        try:
            self._client = Minio(
                settings.address,
                access_key=settings.access_key,
                secret_key=settings.secret_key,
                secure=settings.secure,
                region=settings.region,
                http_client=self._http,
            )
        except ValueError as exc:
            raise InvalidRequest(f"S3 endpoint {self.endpoint!r}: {exc}") from exc
        if create_bucket:
            self._ensure_bucket()

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.endpoint!r})"

    def close(self) -> None:
        """Close pooled connections (the store stays usable; new ones are opened on demand)."""
        self._http.clear()

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's size and etag, or None when it does not exist."""
        name = self._name(key)
        try:
            obj = self._retry(f"stat {key!r}", lambda: self._client.stat_object(self.bucket, name))
        except NotFound:
            return None
        return ObjectInfo(key, int(obj.size or 0), _etag(obj.etag))

    def get_bytes(self, key: str) -> bytes:
        """The whole object; NotFound when it does not exist."""
        name = self._name(key)

        def get() -> bytes:
            response = self._client.get_object(self.bucket, name)
            complete = False
            try:
                data = bytes(response.read())
                complete = True
                return data
            finally:
                _finish(response, complete)

        return self._retry(f"get {key!r}", get)

    def get_range_into(self, key: str, offset: int, view: memoryview) -> None:
        """Fill all of `view` from `offset`, reading the response body straight into it."""
        target = range_target(view, offset)
        if target.nbytes == 0:
            return  # minio reads length=0 as "to the end of the object"
        name = self._name(key)
        done = 0

        def fill() -> None:
            # Resumes after a broken connection: only the bytes still missing are requested.
            nonlocal done
            want = target.nbytes - done
            response = self._client.get_object(self.bucket, name, offset=offset + done, length=want)
            complete = False
            try:
                sent = response.headers.get("content-length")
                if sent is not None and int(sent) != want:
                    raise (ShortObject if int(sent) < want else StoreError)(
                        f"{self.uri}: {key!r}: asked for {want} bytes at {offset + done}, the "
                        f"server sends {sent}; "
                        + (
                            f"the range [{offset}, {offset + target.nbytes}) runs past its end"
                            if int(sent) < want
                            else "it ignored the byte range"
                        )
                    )
                while done < target.nbytes:
                    n = _readinto(response, target[done:])
                    if not n:
                        raise ShortObject(
                            f"{self.uri}: {key!r} ended early; the range [{offset}, "
                            f"{offset + target.nbytes}) runs past its end"
                        )
                    done += n
                complete = True
            finally:
                _finish(response, complete)

        self._retry(f"get {key!r} [{offset}, {offset + target.nbytes})", fill)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Create or replace the object (S3 PUTs are atomic)."""
        name = self._name(key)
        self._call(
            f"put {key!r}",
            lambda: self._client.put_object(
                self.bucket, name, io.BytesIO(data), len(data), part_size=self.settings.part_size
            ),
        )

    def put_file(
        self, key: str, path: Path, *, progress: Callable[[int], None] | None = None
    ) -> None:
        """Upload a local file, in parts of `settings.part_size` when it is larger than one."""
        name = self._name(key)
        src = open_upload(path)
        with src:
            size = Path(path).stat().st_size
            self._call(
                f"put {key!r}",
                lambda: self._client.put_object(
                    self.bucket,
                    name,
                    src,
                    size,
                    part_size=self.settings.part_size,
                    progress=None if progress is None else _Progress(progress),
                ),
            )

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, recursively, in key order."""
        check_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0

        def fetch() -> list[ObjectInfo]:
            # Materialized so a connection error surfaces here (translated), not mid-iteration.
            return [
                ObjectInfo(obj.object_name[strip:], int(obj.size or 0), _etag(obj.etag))
                for obj in self._client.list_objects(self.bucket, prefix=full, recursive=True)
                if obj.object_name is not None and not obj.is_dir
            ]

        yield from self._retry(f"list {prefix!r}", fetch)

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""
        name = self._name(key)
        with contextlib.suppress(NotFound):
            self._call(f"delete {key!r}", lambda: self._client.remove_object(self.bucket, name))

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _ensure_bucket(self) -> None:
        if self._retry("check bucket", lambda: self._client.bucket_exists(self.bucket)):
            return
        try:
            self._call(
                "create bucket",
                lambda: self._client.make_bucket(self.bucket, location=self.settings.region),
            )
        except StoreError as exc:
            cause = exc.__cause__
            # Another process may have created it between our check and our create.
            if not (
                isinstance(cause, S3Error)
                and cause.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")
            ):
                raise

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run an idempotent call, retrying connection failures a few times."""
        for attempt in range(GET_ATTEMPTS):
            try:
                return self._call(what, fn)
            except StoreError as exc:
                if not isinstance(exc.__cause__, Urllib3Error) or attempt == GET_ATTEMPTS - 1:
                    raise
                time.sleep(RETRY_DELAY_S * 2**attempt)
        raise AssertionError("unreachable")

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one client call, translating minio and urllib3 errors."""
        try:
            return fn()
        except S3Error as exc:
            if exc.code in _MISSING:
                raise NotFound(f"{self.uri}: no object for {what}") from exc
            if exc.code == "InvalidRange":  # the range starts at or past the object's end
                raise ShortObject(f"{self.uri}: the range runs past the end ({what})") from exc
            if exc.code == "NoSuchBucket":
                raise NotFound(f"{self.uri}: bucket {self.bucket!r} does not exist") from exc
            raise StoreError(
                f"object store at {self.endpoint} refused to {what} in {self.uri}: "
                f"{exc.code}: {exc.message}"
            ) from exc
        except MinioException as exc:
            raise StoreError(
                f"object store at {self.endpoint} failed to {what} in {self.uri}: {exc}"
            ) from exc
        except Urllib3Error as exc:
            raise StoreError(
                f"object store at {self.endpoint} is unreachable ({what} in {self.uri}): "
                f"{_reason(exc)}"
            ) from exc


class _Progress:
    """Adapts a `progress(n)` callback to the object minio's put_object reports to."""

    def __init__(self, callback: Callable[[int], None]) -> None:
        self._callback = callback

    def set_meta(self, object_name: str, total_length: int) -> None:
        """Called once before the upload; nothing to do."""

    def update(self, size: int) -> None:
        """Called as each block is read for sending."""
        self._callback(size)


def _readinto(response: BaseHTTPResponse, view: memoryview) -> int:
    """Read body bytes straight into `view`; 0 at the end of the body."""
    raw = getattr(response, "_fp", None)
    if (
        raw is not None
        and hasattr(raw, "readinto")
        and not response.headers.get("content-encoding")
    ):
        # urllib3's own readinto reads into a temporary bytes object and copies it; the
        # underlying http.client response reads from the socket into `view` directly.
        try:
            return int(raw.readinto(view))
        except (http.client.HTTPException, OSError) as exc:
            raise ProtocolError(f"connection broken while reading: {exc!r}", exc) from exc
    return response.readinto(view[:READ_BLOCK])


def _finish(response: BaseHTTPResponse, complete: bool) -> None:
    """Hand a fully read connection back to the pool; drop one with unread bytes."""
    if not complete:
        response.close()
    response.release_conn()


def _etag(value: Any) -> str | None:
    return str(value).strip('"') if value else None


def _reason(exc: Urllib3Error) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason is not None else str(exc)

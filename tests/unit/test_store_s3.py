"""S3Store read path without a server: resumed ranged GETs, short bodies, error translation."""

from __future__ import annotations

from typing import Any

import pytest
from minio.error import S3Error

from sllm.core.errors import NotFound, StoreError
from sllm.store import S3Store, StoreSettings

DATA = bytes(range(256)) * 64  # 16 KiB


class FakeResponse:
    """Enough of urllib3's response for S3Store: headers, a raw body, release and close."""

    def __init__(self, body: bytes, *, break_after: int | None = None, length: int | None = None):
        self.headers = {"content-length": str(len(body) if length is None else length)}
        self._fp = _Body(body, break_after)
        self.released = self.closed = False

    def read(self) -> bytes:
        return self._fp.data

    def readinto(self, view: memoryview) -> int:  # pragma: no cover - the raw path is used
        raise AssertionError("S3Store should read the raw body")

    def release_conn(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


class _Body:
    def __init__(self, data: bytes, break_after: int | None) -> None:
        self.data = data
        self.pos = 0
        self.break_after = break_after

    def readinto(self, view: memoryview) -> int:
        if self.break_after is not None and self.pos >= self.break_after:
            raise ConnectionResetError(104, "Connection reset by peer")
        end = len(self.data) if self.break_after is None else self.break_after
        n = min(len(view), end - self.pos, 1000)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


@pytest.fixture
def store() -> S3Store:
    settings = StoreSettings(endpoint="127.0.0.1:9", access_key="a", secret_key="bbbbbbbb")
    return S3Store("bucket", "pre", settings, create_bucket=False)


def test_a_broken_ranged_get_resumes_where_it_stopped(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, int]] = []
    responses: list[FakeResponse] = []

    def get_object(bucket: str, name: str, offset: int = 0, length: int = 0) -> FakeResponse:
        calls.append((name, offset, length))
        body = DATA[offset : offset + length]
        response = FakeResponse(body, break_after=3000 if len(calls) == 1 else None)
        responses.append(response)
        return response

    monkeypatch.setattr(store._client, "get_object", get_object)
    monkeypatch.setattr("sllm.store._s3.RETRY_DELAY_S", 0.0)

    assert store.get_range("k", 100, 10_000) == DATA[100:10_100]

    assert calls == [("pre/k", 100, 10_000), ("pre/k", 3100, 7000)]
    assert responses[0].closed  # a broken connection is not reused
    assert responses[1].released and not responses[1].closed  # a complete one goes back


def test_retries_are_bounded(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def get_object(bucket: str, name: str, offset: int = 0, length: int = 0) -> FakeResponse:
        return FakeResponse(DATA[:length], break_after=0)

    monkeypatch.setattr(store._client, "get_object", get_object)
    monkeypatch.setattr("sllm.store._s3.RETRY_DELAY_S", 0.0)
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:9 .*unreachable"):
        store.get_range("k", 0, 100)


@pytest.mark.parametrize(
    ("length", "message"), [(50, "runs past its end"), (200, "ignored the byte range")]
)
def test_a_body_of_the_wrong_length_is_a_store_error(
    store: S3Store, monkeypatch: pytest.MonkeyPatch, length: int, message: str
) -> None:
    def get_object(*args: Any, **kwargs: Any) -> FakeResponse:
        return FakeResponse(DATA[:length], length=length)

    monkeypatch.setattr(store._client, "get_object", get_object)
    with pytest.raises(StoreError, match=message):
        store.get_range("k", 0, 100)


def test_no_such_key_is_not_found(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise S3Error(None, "NoSuchKey", "gone", "/bucket/pre/k", "r", "h")  # type: ignore[arg-type]

    monkeypatch.setattr(store._client, "get_object", missing)
    monkeypatch.setattr(store._client, "stat_object", missing)
    with pytest.raises(NotFound, match="s3://bucket/pre"):
        store.get_bytes("k")
    assert store.stat("k") is None


def test_other_s3_errors_are_store_errors_naming_the_endpoint(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(*args: Any, **kwargs: Any) -> Any:
        raise S3Error(None, "AccessDenied", "no", "/bucket/pre/k", "r", "h")  # type: ignore[arg-type]

    monkeypatch.setattr(store._client, "put_object", denied)
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:9 .*AccessDenied"):
        store.put_bytes("k", b"x")


def test_uri_names_bucket_and_prefix(store: S3Store) -> None:
    assert store.uri == "s3://bucket/pre"

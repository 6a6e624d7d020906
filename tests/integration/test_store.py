"""The object store on both backends: what a caller of the Store protocol can rely on."""

from __future__ import annotations

import dataclasses
import http.server
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import urllib3.connection

from sllm.core.errors import InvalidRequest, NotFound, StoreError
from sllm.store import (
    LocalStore,
    S3Store,
    ShortObject,
    Store,
    StoreSettings,
    open_store,
)
from tests.support.s3 import free_port

MIB = 1024 * 1024


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, file_store_uri: str) -> Store:
    """An empty store of each backend."""
    if request.param == "file":
        return open_store(file_store_uri)
    uri, settings = request.getfixturevalue("s3_store_uri")
    return open_store(uri, settings)


def pattern(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_put_get_stat_round_trip(store: Store) -> None:
    store.put_bytes("a/b/c.bin", b"hello world")

    assert store.get_bytes("a/b/c.bin") == b"hello world"
    info = store.stat("a/b/c.bin")
    assert info is not None and info.key == "a/b/c.bin" and info.size == 11
    assert store.stat("a/b/missing") is None
    assert store.stat("a/b") is None  # a "folder" is not an object


def test_overwrite_replaces_the_object_and_its_etag(store: Store) -> None:
    store.put_bytes("k", b"one")
    first = store.stat("k")
    store.put_bytes("k", b"second")

    second = store.stat("k")
    assert store.get_bytes("k") == b"second"
    assert first is not None and second is not None and second.size == 6
    assert first.etag != second.etag


def test_empty_object(store: Store) -> None:
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    info = store.stat("empty")
    assert info is not None and (info.key, info.size) == ("empty", 0)
    assert store.get_range("empty", 0, 0) == b""


def test_ranges(store: Store) -> None:
    data = pattern(100_000)
    store.put_bytes("blob", data)

    assert store.get_range("blob", 0, 10) == data[:10]
    assert store.get_range("blob", 12_345, 50_000) == data[12_345:62_345]
    assert store.get_range("blob", 99_990, 10) == data[-10:]
    assert store.get_range("blob", 500, 0) == b""


def test_range_into_fills_the_callers_buffer(store: Store) -> None:
    data = pattern(70_000, seed=1)
    store.put_bytes("blob", data)
    target = np.zeros(40_000, dtype=np.uint8)

    store.get_range_into("blob", 30_000, memoryview(target))

    assert target.tobytes() == data[30_000:70_000]
    wide = np.zeros(100, dtype=np.float32)  # a non-byte view is filled byte for byte
    store.get_range_into("blob", 4, memoryview(wide))
    assert wide.tobytes() == data[4:404]


@pytest.mark.parametrize(
    ("offset", "length"), [(99_999, 2), (100_000, 1), (200_000, 5)], ids=["tail", "end", "past"]
)
def test_range_past_the_end_is_a_short_object(store: Store, offset: int, length: int) -> None:
    store.put_bytes("blob", bytes(100_000))
    with pytest.raises(ShortObject):
        store.get_range("blob", offset, length)


def test_negative_range_is_rejected(store: Store) -> None:
    store.put_bytes("blob", b"abc")
    with pytest.raises(InvalidRequest):
        store.get_range("blob", -1, 2)


def test_missing_object_is_not_found(store: Store) -> None:
    for call in (
        lambda: store.get_bytes("nope"),
        lambda: store.get_range("nope", 0, 1),
        lambda: store.get_range_into("nope", 0, memoryview(bytearray(4))),
    ):
        with pytest.raises(NotFound, match="nope"):
            call()


def test_list_is_recursive_sorted_and_prefix_filtered(store: Store) -> None:
    for key in ("models/x/2/data.0", "models/x/1/manifest.json", "models/y/p.json", "other"):
        store.put_bytes(key, key.encode())

    assert [i.key for i in store.list("")] == [
        "models/x/1/manifest.json",
        "models/x/2/data.0",
        "models/y/p.json",
        "other",
    ]
    assert [i.key for i in store.list("models/x/")] == [
        "models/x/1/manifest.json",
        "models/x/2/data.0",
    ]
    assert [(i.key, i.size) for i in store.list("models/y")] == [("models/y/p.json", 15)]
    assert list(store.list("absent/")) == []


def test_delete(store: Store) -> None:
    store.put_bytes("d/one", b"1")
    store.put_bytes("d/two", b"2")

    store.delete("d/one")
    store.delete("d/one")  # deleting twice is fine

    assert store.stat("d/one") is None
    assert [i.key for i in store.list("d/")] == ["d/two"]
    with pytest.raises(NotFound):
        store.get_bytes("d/one")


def test_put_file_reports_progress(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    data = pattern(300_000, seed=2)
    src.write_bytes(data)
    seen: list[int] = []

    store.put_file("files/f.bin", src, progress=seen.append)

    assert store.get_bytes("files/f.bin") == data
    assert sum(seen) == len(data)


def test_put_file_of_a_missing_file_is_not_found(store: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such file"):
        store.put_file("x", tmp_path / "absent.bin")
    assert store.stat("x") is None


@pytest.mark.parametrize("backend", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_large_file_round_trips_in_parts(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """12 MB with 5 MiB parts: a multipart upload on S3, a block copy on the folder store."""
    if backend == "file":
        store: Store = LocalStore(tmp_path / "local")
    else:
        uri, settings = request.getfixturevalue("s3_store_uri")
        store = open_store(uri, dataclasses.replace(settings, part_size=5 * MIB))
    src = tmp_path / "big.bin"
    data = pattern(12 * 1000 * 1000, seed=3)
    src.write_bytes(data)
    seen: list[int] = []

    store.put_file("big/data.0", src, progress=seen.append)

    info = store.stat("big/data.0")
    assert info is not None and info.size == len(data)
    assert store.get_bytes("big/data.0") == data
    assert store.get_range("big/data.0", 5 * MIB - 7, 20) == data[5 * MIB - 7 : 5 * MIB + 13]
    assert sum(seen) == len(data)
    if backend == "s3":
        assert info.etag is not None and info.etag.endswith("-3"), info.etag  # 3 parts


def test_concurrent_ranged_gets(store: Store) -> None:
    data = pattern(2 * MIB, seed=4)
    store.put_bytes("blob", data)
    piece = 64 * 1024
    target = bytearray(len(data))
    view = memoryview(target)
    threads: set[int] = set()

    def fetch(i: int) -> None:
        threads.add(threading.get_ident())
        store.get_range_into("blob", i * piece, view[i * piece : (i + 1) * piece])

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(fetch, range(len(data) // piece)))

    assert bytes(target) == data
    assert len(threads) > 1


@pytest.mark.parametrize(
    "key",
    [
        "../escape",
        "a/../../escape",
        "/etc/passwd",
        "a//b",
        "a\\b",
        "",
        "./a",
        "a/",
        "a/.",
        "x\x00y",
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "empty-segment",
        "backslash",
        "empty",
        "dot",
        "trailing-slash",
        "trailing-dot",
        "nul",
    ],
)
def test_keys_that_could_escape_are_rejected(store: Store, key: str, tmp_path: Path) -> None:
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.stat(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(InvalidRequest, match="key"):
            call()
    assert not (tmp_path / "escape").exists()


@pytest.mark.s3
def test_refused_connection_is_a_store_error_naming_the_endpoint() -> None:
    port = free_port()  # nothing listens there
    settings = StoreSettings(endpoint=f"127.0.0.1:{port}", access_key="a", secret_key="bbbbbbbb")
    start = time.monotonic()
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}.*unreachable"):
        open_store("s3://models", settings)
    store = S3Store("models", "", settings, create_bucket=False)
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}"):
        store.get_range("k", 0, 10)
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}"):
        list(store.list(""))
    assert time.monotonic() - start < 15


@pytest.mark.s3
def test_s3_prefix_keeps_stores_apart(s3_store_uri: tuple[str, StoreSettings]) -> None:
    uri, settings = s3_store_uri
    root = open_store(uri, settings)
    a = open_store(f"{uri}/team-a", settings)
    b = open_store(f"{uri}/team-b/nested", settings)
    a.put_bytes("x", b"a")
    b.put_bytes("x", b"b")

    assert a.get_bytes("x") == b"a" and b.get_bytes("x") == b"b"
    assert [i.key for i in a.list("")] == ["x"]
    assert [i.key for i in root.list("")] == ["team-a/x", "team-b/nested/x"]
    assert a.uri == f"{uri}/team-a"


@pytest.mark.s3
def test_s3_store_reopens_an_existing_bucket(s3_store_uri: tuple[str, StoreSettings]) -> None:
    uri, settings = s3_store_uri
    open_store(uri, settings).put_bytes("k", b"v")
    assert open_store(uri, settings).get_bytes("k") == b"v"


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the requested byte range of BLOB, keeping connections alive."""

    protocol_version = "HTTP/1.1"  # moto's server closes every connection; this one does not
    blob = bytes(range(256)) * 100

    def do_GET(self) -> None:
        first, last = self.headers["Range"].removeprefix("bytes=").split("-")
        body = self.blob[int(first) : int(last) + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_s3_ranged_gets_reuse_pooled_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fully read ranged GET hands its connection back: no TCP handshake per read."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    connects: list[object] = []
    connect = urllib3.connection.HTTPConnection.connect

    def counting_connect(self: urllib3.connection.HTTPConnection) -> None:
        connects.append(self)
        connect(self)

    monkeypatch.setattr(urllib3.connection.HTTPConnection, "connect", counting_connect)
    settings = StoreSettings(
        endpoint=f"127.0.0.1:{server.server_address[1]}",
        access_key="a",
        secret_key="bbbbbbbb",
        region="us-east-1",
    )
    try:
        store = S3Store("bucket", "", settings, create_bucket=False)
        blob = _RangeHandler.blob
        for i in range(10):
            assert store.get_range("k", i * 7, 1000) == blob[i * 7 : i * 7 + 1000]
    finally:
        server.shutdown()
        server.server_close()
    assert len(connects) == 1

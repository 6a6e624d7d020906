"""The native I/O engine used directly: crc32c, HostMemory and the threaded Reader."""

from __future__ import annotations

import ctypes
import errno
import gc
import itertools
import mmap
import os
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sllm.native_loader import _engine
from sllm.native_loader._memory import as_tensor

PAGE = mmap.PAGESIZE
Completion = tuple[object, int, int, int, int, int]


# ------------------------------------------------------------------ crc32c
def _crc32c_reference(data: bytes, crc: int = 0) -> int:
    """Bitwise CRC32C (Castagnoli, reflected polynomial 0x82F63B78)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def test_crc32c_check_value() -> None:
    assert _engine.crc32c(b"123456789") == 0xE3069283
    assert _crc32c_reference(b"123456789") == 0xE3069283


def test_crc32c_of_nothing_is_the_start_value() -> None:
    assert _engine.crc32c(b"") == 0
    assert _engine.crc32c(b"", 0x1234) == 0x1234


@pytest.mark.parametrize("length", [1, 3, 7, 9, 63, 4097, 70_001])
def test_crc32c_matches_reference_on_random_data(length: int) -> None:
    data = random.Random(length).randbytes(length + 3)
    # Slicing off 1..3 bytes makes the start unaligned, exercising the byte-wise prologue.
    for start in (0, 1, 3):
        view = memoryview(data)[start : start + length]
        assert _engine.crc32c(view) == _crc32c_reference(bytes(view))


@pytest.mark.parametrize(
    "cuts", [(0,), (1,), (5, 17), (8, 16, 4104), (65_537,), (3, 65_540, 70_000)]
)
def test_crc32c_incremental_equals_one_shot(cuts: tuple[int, ...]) -> None:
    data = random.Random(sum(cuts)).randbytes(70_003)
    bounds = [0, *cuts, len(data)]
    crc = 0
    for start, end in itertools.pairwise(bounds):
        crc = _engine.crc32c(data[start:end], crc)
    assert crc == _engine.crc32c(data)
    assert _engine.crc32c(data, value=0) == crc


def test_crc32c_accepts_any_bytes_like_object() -> None:
    data = b"checkpoint bytes"
    expected = _engine.crc32c(data)
    assert _engine.crc32c(bytearray(data)) == expected
    assert _engine.crc32c(memoryview(data)) == expected
    assert _engine.crc32c(torch.frombuffer(bytearray(data), dtype=torch.uint8).numpy()) == expected
    with pytest.raises(TypeError):
        _engine.crc32c("text is not bytes")


# -------------------------------------------------------------- HostMemory
def test_host_memory_is_page_aligned_and_rounded_to_pages() -> None:
    mem = _engine.HostMemory(10_000)
    assert mem.address % PAGE == 0
    assert mem.nbytes == -(-10_000 // PAGE) * PAGE
    assert _engine.HostMemory(0).nbytes == PAGE
    with pytest.raises(ValueError, match="nbytes"):
        _engine.HostMemory(-1)


def test_host_memory_exposes_a_writable_buffer_at_its_address() -> None:
    mem = _engine.HostMemory(PAGE, hugepages=False)
    view = memoryview(mem)
    assert not view.readonly
    assert view.nbytes == mem.nbytes
    view[:5] = b"hello"
    view[-1] = 0x7F
    assert ctypes.string_at(mem.address, 5) == b"hello"
    assert ctypes.string_at(mem.address + mem.nbytes - 1, 1) == b"\x7f"
    assert bytes(view[5:10]) == bytes(5)  # fresh anonymous memory reads as zeros
    view.release()


def test_exports_count_live_torch_views_and_drop_when_they_die() -> None:
    mem = _engine.HostMemory(PAGE)
    assert mem.exports == 0
    base = torch.frombuffer(memoryview(mem), dtype=torch.uint8, count=64)
    assert mem.exports == 1
    part = base[8:16].view(torch.int32)
    del base
    gc.collect()
    assert mem.exports == 1  # a slice keeps the storage, and so the export, alive
    del part
    gc.collect()
    assert mem.exports == 0


def test_as_tensor_view_holds_an_export_while_alive() -> None:
    """Regression: torch.frombuffer(mem) drops its export at once; as_tensor must keep one."""
    mem = _engine.HostMemory(PAGE)
    tensor = as_tensor(mem, 128)
    assert mem.exports >= 1
    with pytest.raises(BufferError):
        mem.release()  # unmapping now would leave `tensor` pointing at freed memory
    del tensor


def test_release_refuses_while_a_view_is_alive() -> None:
    mem = _engine.HostMemory(PAGE)
    view = memoryview(mem)

    with pytest.raises(BufferError, match="1 live views"):
        mem.release()
    assert mem.nbytes == PAGE  # still mapped

    view.release()
    mem.release()
    assert mem.nbytes == 0
    with pytest.raises(ValueError, match="released"):
        memoryview(mem)
    mem.release()  # releasing twice is harmless


def test_on_release_runs_once_with_the_address() -> None:
    calls: list[int] = []
    mem = _engine.HostMemory(PAGE)
    address = mem.address
    mem.set_on_release(calls.append)

    mem.release()
    del mem
    gc.collect()

    assert calls == [address]


def test_on_release_runs_when_the_memory_is_garbage_collected() -> None:
    calls: list[int] = []
    mem = _engine.HostMemory(PAGE)
    address = mem.address
    mem.set_on_release(calls.append)
    del mem
    gc.collect()
    assert calls == [address]


def test_on_release_can_be_cleared_and_must_be_callable() -> None:
    calls: list[int] = []
    mem = _engine.HostMemory(PAGE)
    mem.set_on_release(calls.append)
    mem.set_on_release(None)
    with pytest.raises(TypeError, match="callable"):
        mem.set_on_release(42)
    mem.release()
    assert calls == []


# ------------------------------------------------------------------ Reader
def _drain(reader: _engine.Reader, timeout: float = 10.0) -> list[Completion]:
    out = []
    deadline = time.monotonic() + timeout
    while reader.pending:
        done = reader.next(timeout=max(0.0, deadline - time.monotonic()))
        assert done is not None, "reader stalled"
        out.append(done)
    return out


def _o_direct_works(path: Path) -> bool:
    """Whether this filesystem lets `path` be opened with O_DIRECT."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def _tmpfs_dir() -> Path | None:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "/dev/shm" and fields[2] == "tmpfs":
                return Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
    return None


@pytest.fixture
def payload() -> bytes:
    return random.Random(7).randbytes(5 * PAGE + 1000)  # last chunk is short


@pytest.fixture
def data_file(tmp_path: Path, payload: bytes) -> Path:
    path = tmp_path / "data.0"
    path.write_bytes(payload)
    return path


@pytest.fixture
def shm_file(payload: bytes) -> Iterator[Path]:
    folder = _tmpfs_dir()
    if folder is None:
        pytest.skip("/dev/shm is not a writable tmpfs here")
    path = folder / f"sllm-test-{uuid.uuid4().hex}"
    path.write_bytes(payload)
    try:
        yield path
    finally:
        path.unlink()


def _read_all(
    path: Path, size: int, *, direct: bool = True, threads: int = 4
) -> tuple[bytes, list[Completion], tuple[bool, ...]]:
    """Read `path` chunk by chunk with checksums; returns bytes, completions, direct flags."""
    mem = _engine.HostMemory(size)
    data = path.read_bytes()
    with _engine.Reader([str(path)], threads=threads, direct=direct) as reader:
        for i, off in enumerate(range(0, size, PAGE)):
            length = min(PAGE, size - off)
            reader.submit(
                0, off, length, mem, off, _engine.crc32c(data[off : off + length]), ("chunk", i)
            )
        done = _drain(reader)
        flags = reader.direct
    return bytes(memoryview(mem)[:size]), done, flags


def test_reader_reads_a_file_in_chunks_with_checksums(data_file: Path, payload: bytes) -> None:
    got, done, _ = _read_all(data_file, len(payload))

    assert got == payload
    assert sorted(d[0] for d in done) == [("chunk", i) for i in range(6)]  # type: ignore[type-var]
    assert {d[1] for d in done} == {_engine.OK}
    assert sorted(d[4] for d in done) == list(range(0, len(payload), PAGE))


def test_reader_reports_o_direct_on_a_disk_that_supports_it(
    data_file: Path, payload: bytes
) -> None:
    got, _, flags = _read_all(data_file, len(payload))
    assert flags == (_o_direct_works(data_file),)
    assert got == payload


def test_reader_on_tmpfs_reads_correctly_with_or_without_o_direct(
    shm_file: Path, payload: bytes
) -> None:
    # Older kernels refuse O_DIRECT on tmpfs (the engine then reads plainly); 6.6+ accept it.
    got, done, flags = _read_all(shm_file, len(payload))
    assert flags == (_o_direct_works(shm_file),)
    assert {d[1] for d in done} == {_engine.OK}
    assert got == payload


def test_reader_without_direct_uses_plain_reads(data_file: Path, payload: bytes) -> None:
    got, _, flags = _read_all(data_file, len(payload), direct=False)
    assert flags == (False,)
    assert got == payload


def test_unaligned_requests_fall_back_to_plain_reads(data_file: Path, payload: bytes) -> None:
    dest = bytearray(300)
    with _engine.Reader([str(data_file)], threads=2) as reader:
        reader.submit(0, 4099, 100, dest, 0, -1, "odd-offset")
        reader.submit(0, 0, 100, dest, 101, -1, "odd-dest")
        done = _drain(reader)
    assert {d[1] for d in done} == {_engine.OK}
    assert dest[:100] == payload[4099:4199]
    assert dest[101:201] == payload[:100]


def test_reader_reads_the_file_named_by_index(tmp_path: Path) -> None:
    paths = [tmp_path / f"data.{i}" for i in range(3)]
    for i, p in enumerate(paths):
        p.write_bytes(bytes([i + 1]) * PAGE)
    dest = bytearray(3 * PAGE)
    with _engine.Reader([str(p) for p in paths], threads=3) as reader:
        assert reader.paths == tuple(str(p) for p in paths)
        for i in (2, 0, 1):
            reader.submit(i, 0, PAGE, dest, i * PAGE, -1, i)
        done = _drain(reader)
    assert sorted((d[0], d[3]) for d in done) == [(0, 0), (1, 1), (2, 2)]
    assert dest == bytes([1]) * PAGE + bytes([2]) * PAGE + bytes([3]) * PAGE


def test_wrong_checksum_completes_as_checksum_with_the_actual_crc(
    data_file: Path, payload: bytes
) -> None:
    mem = _engine.HostMemory(PAGE)
    actual = _engine.crc32c(payload[PAGE : 2 * PAGE])
    with _engine.Reader([str(data_file)], threads=1) as reader:
        reader.submit(0, PAGE, PAGE, mem, 0, actual ^ 1, "bad")
        (done,) = _drain(reader)
    tag, kind, err, file, offset, got_crc = done
    assert (tag, kind, err, file, offset) == ("bad", _engine.CHECKSUM, 0, 0, PAGE)
    assert got_crc == actual


def test_reading_past_end_of_file_completes_as_short(data_file: Path, payload: bytes) -> None:
    size = len(payload)
    tail = size - size % PAGE
    mem = _engine.HostMemory(2 * PAGE)
    with _engine.Reader([str(data_file)], threads=2) as reader:
        reader.submit(0, tail, PAGE, mem, 0, -1, "tail")
        reader.submit(0, size + PAGE, PAGE, mem, PAGE, -1, "beyond")
        done = {d[0]: d for d in _drain(reader)}
    assert done["tail"][1] == _engine.SHORT
    assert done["tail"][5] == size - tail  # bytes actually read
    assert bytes(memoryview(mem)[: size - tail]) == payload[tail:]
    assert done["beyond"][1] == _engine.SHORT
    assert done["beyond"][5] == 0


def test_os_error_completes_with_errno(tmp_path: Path) -> None:
    dest = bytearray(PAGE)
    with _engine.Reader([str(tmp_path)], threads=1) as reader:  # a directory opens, never reads
        reader.submit(0, 0, 16, dest, 0, -1, "dir")
        (done,) = _drain(reader)
    assert done[1] == _engine.OSERROR
    assert done[2] == errno.EISDIR


def test_cancel_before_submit_cancels_everything(data_file: Path) -> None:
    dest = bytearray(PAGE)
    with _engine.Reader([str(data_file)], threads=1) as reader:
        reader.cancel()
        for i in range(20):
            reader.submit(0, 0, PAGE, dest, 0, -1, i)
        done = _drain(reader)
    assert len(done) == 20
    assert {d[1] for d in done} == {_engine.CANCELLED}
    assert dest == bytes(PAGE)  # nothing was read


def test_cancel_completes_queued_requests_as_cancelled(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(16 * 1024 * 1024))
    small = random.Random(1).randbytes(PAGE)
    (tmp_path / "small").write_bytes(small)
    n = 200
    slow = _engine.HostMemory(16 * 1024 * 1024)
    dest = bytearray(n * PAGE)
    with _engine.Reader([str(big), str(tmp_path / "small")], threads=1) as reader:
        reader.submit(0, 0, 16 * 1024 * 1024, slow, 0, -1, "slow")  # keeps the only worker busy
        for i in range(n):
            reader.submit(1, 0, PAGE, dest, i * PAGE, -1, i)
        reader.cancel()
        done = _drain(reader)
    kinds = {d[0]: d[1] for d in done}
    assert len(done) == n + 1
    cancelled = [i for i in range(n) if kinds[i] == _engine.CANCELLED]
    served = [i for i in range(n) if kinds[i] == _engine.OK]
    assert len(cancelled) + len(served) == n
    assert cancelled, "no queued request was cancelled"
    for i in cancelled:
        assert dest[i * PAGE : (i + 1) * PAGE] == bytes(PAGE)
    for i in served:
        assert dest[i * PAGE : (i + 1) * PAGE] == small


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param((0, 0, PAGE + 1, "mem", 0, -1, None), "too small", id="dest-too-small"),
        pytest.param((0, 0, 16, "mem", PAGE, -1, None), "too small", id="dest-offset-at-end"),
        pytest.param((1, 0, 16, "mem", 0, -1, None), "file index", id="file-index-too-big"),
        pytest.param((-1, 0, 16, "mem", 0, -1, None), "file index", id="file-index-negative"),
        pytest.param((0, -1, 16, "mem", 0, -1, None), "non-negative", id="negative-offset"),
        pytest.param((0, 0, -16, "mem", 0, -1, None), "non-negative", id="negative-length"),
        pytest.param((0, 0, 16, "mem", 0, 2**32, None), "crc", id="crc-too-big"),
        pytest.param((0, 0, 16, "mem", 0, -2, None), "crc", id="crc-negative"),
    ],
)
def test_submit_rejects_bad_requests(data_file: Path, args: tuple[object, ...], match: str) -> None:
    mem = _engine.HostMemory(PAGE)
    call = tuple(mem if a == "mem" else a for a in args)
    with _engine.Reader([str(data_file)], threads=1) as reader:
        with pytest.raises(ValueError, match=match):
            reader.submit(*call)
        assert reader.pending == 0


def test_submit_needs_a_writable_destination(data_file: Path) -> None:
    with _engine.Reader([str(data_file)], threads=1) as reader:
        with pytest.raises(TypeError):
            reader.submit(0, 0, 16, bytes(16), 0, -1, None)
        assert reader.pending == 0


def test_opening_a_missing_file_raises_file_not_found(tmp_path: Path, data_file: Path) -> None:
    missing = tmp_path / "data.9"
    with pytest.raises(FileNotFoundError) as info:
        _engine.Reader([str(data_file), str(missing)])
    assert info.value.filename == str(missing)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"paths": []}, "1..65536", id="no-paths"),
        pytest.param({"threads": 0}, "threads", id="zero-threads"),
        pytest.param({"threads": 1000}, "threads", id="too-many-threads"),
    ],
)
def test_reader_rejects_bad_arguments(
    data_file: Path, kwargs: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {"paths": [str(data_file)], **kwargs}
    with pytest.raises(ValueError, match=match):
        _engine.Reader(**args)


def test_next_returns_none_when_nothing_is_pending(data_file: Path) -> None:
    with _engine.Reader([str(data_file)], threads=1) as reader:
        start = time.monotonic()
        assert reader.next(timeout=0.01) is None
        assert reader.next() is None  # no timeout, but nothing to wait for
        assert time.monotonic() - start < 10, "next() waited although nothing was pending"
        with pytest.raises(ValueError, match="timeout"):
            reader.next(timeout=-1)


def test_close_twice_is_fine_and_a_closed_reader_refuses_work(data_file: Path) -> None:
    reader = _engine.Reader([str(data_file)], threads=2)
    reader.close()
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.submit(0, 0, 16, bytearray(16), 0, -1, None)
    with pytest.raises(ValueError, match="closed"):
        reader.next(timeout=0)


def test_reader_as_context_manager_closes_on_exit(data_file: Path, payload: bytes) -> None:
    dest = bytearray(64)
    with _engine.Reader([str(data_file)], threads=1) as reader:
        assert isinstance(reader, _engine.Reader)
        reader.submit(0, 0, 64, dest, 0, _engine.crc32c(payload[:64]), "only")
        assert reader.next(timeout=10)[:2] == ("only", _engine.OK)
    assert dest == payload[:64]
    with pytest.raises(ValueError, match="closed"):
        reader.submit(0, 0, 64, dest, 0, -1, None)


def test_close_with_requests_in_flight_releases_their_buffers(data_file: Path) -> None:
    mem = _engine.HostMemory(PAGE)
    reader = _engine.Reader([str(data_file)], threads=1)
    for i in range(50):
        reader.submit(0, 0, PAGE, mem, 0, -1, i)
    assert mem.exports > 0  # the reader holds the destination while requests are queued
    reader.close()
    assert mem.exports == 0
    mem.release()

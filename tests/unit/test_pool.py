"""HostPool, the DRAM tier: hits, LRU eviction, capacity, replacement on disk, single flight."""

from __future__ import annotations

import gc
import importlib.util
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import sllm.native_loader._load as load_mod
import sllm.native_loader._pool as pool_mod
from sllm.native_loader import (
    CapacityError,
    ChecksumError,
    HostPool,
    LoadResult,
    load,
    load_with_info,
    save_state_dict,
)

MiB = 1 << 20
JOIN_TIMEOUT = 30.0


def _state_dict(value: float) -> dict[str, torch.Tensor]:
    return {
        "layers.0.weight": torch.full((64, 64), value),
        "layers.0.bias": torch.arange(16, dtype=torch.float32) + value,
        "ids": torch.arange(3000, dtype=torch.int64),
    }


@pytest.fixture
def make_ckpt(tmp_path: Path) -> Callable[..., Path]:
    """Write a small checkpoint whose tensors all carry `value`; returns its folder."""

    def make(name: str, value: float = 1.0, **kwargs: Any) -> Path:
        folder = tmp_path / name
        save_state_dict(_state_dict(value), folder, **kwargs)
        return folder

    return make


@pytest.fixture
def slot(make_ckpt: Callable[..., Path]) -> int:
    """Bytes one small (single-partition) checkpoint occupies in a pool."""
    pool = HostPool(1 << 30, pin=False)
    load(make_ckpt("probe"), pool=pool)
    gc.collect()
    assert pool.used_bytes > 0
    return pool.used_bytes


def _assert_values(tensors: dict[str, torch.Tensor], value: float) -> None:
    expected = _state_dict(value)
    assert tensors.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), name


def _run_threads(n: int, work: Callable[[], Any]) -> list[Any]:
    """Run `work` in n threads released together; results (or exceptions) in thread order."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait(timeout=JOIN_TIMEOUT)
        try:
            results[i] = work()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a loading thread hung"
    return results


def _held_until_joined(monkeypatch: pytest.MonkeyPatch, module: Any, callers: int) -> list[int]:
    """Wrap module.read_partitions: count calls, and hold the read until the other
    `callers - 1` loads wait for it, so every caller joins the one load in flight."""
    real = module.read_partitions
    calls = [0]
    waiting = [0]
    changed = threading.Condition()

    class CountingEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            with changed:
                waiting[0] += 1
                changed.notify_all()
            return super().wait(timeout)

    # What a caller that found the load in flight waits on: the pool entry's `ready`, or the
    # single-flight `done` of a load without a pool.
    if module is pool_mod:
        entry = pool_mod._Entry
        monkeypatch.setattr(
            pool_mod, "_Entry", lambda identity: entry(identity, ready=CountingEvent())
        )
    else:

        class Flight(load_mod._Flight):
            def __init__(self) -> None:
                super().__init__()
                self.done = CountingEvent()

        monkeypatch.setattr(load_mod, "_Flight", Flight)

    def read_partitions(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        with changed:
            joined = changed.wait_for(lambda: waiting[0] >= callers - 1, timeout=JOIN_TIMEOUT)
        if not joined:
            raise AssertionError(f"{waiting[0]} of {callers - 1} callers joined the load")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "read_partitions", read_partitions)
    return calls


# ------------------------------------------------------------------- hits
def test_first_load_reads_and_second_is_a_hit(make_ckpt: Callable[..., Path]) -> None:
    ckpt = make_ckpt("a", 1.0)
    pool = HostPool(64 * MiB, pin=False)

    first = load_with_info(ckpt, pool=pool)
    second = load_with_info(ckpt, pool=pool)

    assert (first.hit, second.hit) == (False, True)
    assert first.stats is not None and first.stats.nbytes == first.manifest.total_bytes
    assert second.stats is None
    assert (pool.misses, pool.hits) == (1, 1)
    assert ckpt in pool
    _assert_values(first.tensors, 1.0)
    for name, t in first.tensors.items():
        assert torch.equal(second.tensors[name], t)
        assert second.tensors[name].data_ptr() == t.data_ptr()  # served from the same memory


def test_pool_tensors_are_views_into_pool_memory(make_ckpt: Callable[..., Path]) -> None:
    ckpt = make_ckpt("a")
    pool = HostPool(64 * MiB, pin=False)
    tensors = load(ckpt, pool=pool)

    with pool.checkout(ckpt) as held:
        spans = [(b.address, b.address + b.nbytes) for b in held.buffers]
        assert held.hit
    for name, t in tensors.items():
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        assert any(lo <= start and end <= hi for lo, hi in spans), name


def test_pool_loads_equal_a_plain_load(make_ckpt: Callable[..., Path]) -> None:
    ckpt = make_ckpt("a", 3.0, device_map=None)
    pooled = load(ckpt, pool=HostPool(64 * MiB, pin=False))
    plain = load(ckpt)
    assert pooled.keys() == plain.keys()
    for name in plain:
        assert torch.equal(pooled[name], plain[name])


# -------------------------------------------------------------- capacity
def test_lru_evicts_the_least_recently_used_idle_checkpoint(
    make_ckpt: Callable[..., Path], slot: int
) -> None:
    a, b, c = make_ckpt("a", 1.0), make_ckpt("b", 2.0), make_ckpt("c", 3.0)
    pool = HostPool(2 * slot + slot // 2, pin=False)

    _assert_values(load(a, pool=pool), 1.0)
    _assert_values(load(b, pool=pool), 2.0)
    assert load_with_info(a, pool=pool).hit  # a is now more recent than b
    gc.collect()
    _assert_values(load(c, pool=pool), 3.0)
    gc.collect()

    assert a in pool
    assert b not in pool
    assert c in pool
    assert [Path(r[0]).name for r in pool.resident()] == ["a", "c"]
    assert pool.used_bytes <= pool.capacity
    reloaded = load_with_info(b, pool=pool)
    assert not reloaded.hit
    _assert_values(reloaded.tensors, 2.0)


def test_checkpoint_with_live_tensors_is_never_evicted(
    make_ckpt: Callable[..., Path], slot: int
) -> None:
    """Regression: evicting under live views once let B's bytes show through A's tensors."""
    a, b = make_ckpt("a", 1.0), make_ckpt("b", 2.0)
    pool = HostPool(slot + slot // 2, pin=False)
    tensors_a = load(a, pool=pool)

    with pytest.raises(CapacityError):
        load(b, pool=pool)

    assert a in pool
    _assert_values(tensors_a, 1.0)


def test_loading_succeeds_once_the_old_tensors_are_gone(
    make_ckpt: Callable[..., Path], slot: int
) -> None:
    a, b = make_ckpt("a", 1.0), make_ckpt("b", 2.0)
    pool = HostPool(slot + slot // 2, pin=False)
    tensors_a = load(a, pool=pool)
    _assert_values(tensors_a, 1.0)
    del tensors_a
    gc.collect()

    tensors_b = load(b, pool=pool)

    _assert_values(tensors_b, 2.0)
    assert a not in pool
    assert b in pool
    assert pool.used_bytes == slot


def test_eviction_hands_the_freed_buffer_to_the_next_load(
    make_ckpt: Callable[..., Path], slot: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = make_ckpt("a", 1.0), make_ckpt("b", 2.0)
    pool = HostPool(slot + slot // 2, pin=False)
    load(a, pool=pool)
    gc.collect()
    allocations: list[int] = []
    real = pool_mod.allocate

    def allocate(nbytes: int, **kwargs: Any) -> Any:
        allocations.append(nbytes)
        return real(nbytes, **kwargs)

    monkeypatch.setattr(pool_mod, "allocate", allocate)

    _assert_values(load(b, pool=pool), 2.0)

    assert allocations == []


def test_alternating_sizes_never_leak_capacity(tmp_path: Path) -> None:
    """Regression: an unmapped buffer once gave back 0 bytes, so the pool filled up while empty."""
    folders = {}
    for mib in (4, 8):
        folders[mib] = tmp_path / f"m{mib}"
        # A little under the size, so the partition rounds to exactly `mib` MiB.
        save_state_dict({"w": torch.zeros(mib * MiB - 64 * 1024, dtype=torch.uint8)}, folders[mib])
    pool = HostPool(10 * MiB, pin=False)

    for mib in (4, 8) * 3:  # each load must unmap the other model's buffer to fit
        tensors = load(folders[mib], pool=pool)
        assert int(tensors["w"].sum()) == 0
        del tensors
        gc.collect()
        assert [Path(r[0]).name for r in pool.resident()] == [f"m{mib}"]
        assert pool.used_bytes == mib * MiB

    pool.clear()
    assert pool.used_bytes == 0


def test_checkpoint_larger_than_the_pool_raises_capacity_error(
    make_ckpt: Callable[..., Path], slot: int
) -> None:
    ckpt = make_ckpt("a")
    pool = HostPool(slot // 2, pin=False)

    with pytest.raises(CapacityError, match="capacity"):
        load(ckpt, pool=pool)

    assert ckpt not in pool
    assert pool.used_bytes == 0


def test_failed_multi_partition_load_gives_its_memory_back(
    tmp_path: Path, make_ckpt: Callable[..., Path], slot: int
) -> None:
    two = tmp_path / "two"
    layers = {f"model.layers.{i}.weight": torch.full((64, 64), float(i)) for i in range(2)}
    manifest = save_state_dict(layers, two, device_map=2)
    assert len(manifest.partitions) == 2
    one = make_ckpt("one", 2.0)
    pool = HostPool(slot + slot // 2, pin=False)  # room for one partition, not two

    with pytest.raises(CapacityError):
        load(two, pool=pool)

    assert two not in pool
    _assert_values(load(one, pool=pool), 2.0)  # the pool is empty, so one partition fits
    assert pool.used_bytes <= pool.capacity


def test_pool_rejects_a_non_positive_capacity() -> None:
    with pytest.raises(ValueError, match="capacity"):
        HostPool(0)


def test_reserve_premaps_buffers_that_loads_then_use(
    make_ckpt: Callable[..., Path], slot: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = make_ckpt("a", 1.0)
    pool = HostPool(4 * slot, pin=False)

    pool.reserve([slot, slot])

    assert pool.used_bytes == 2 * slot
    monkeypatch.setattr(pool_mod, "allocate", _forbidden)
    _assert_values(load(ckpt, pool=pool), 1.0)
    assert pool.used_bytes == 2 * slot  # served from a reserved buffer, nothing new mapped


def _forbidden(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the pool mapped new memory although a reserved buffer fits")


def test_reserve_beyond_capacity_raises_capacity_error(slot: int) -> None:
    pool = HostPool(2 * slot, pin=False)
    with pytest.raises(CapacityError):
        pool.reserve([3 * slot])
    assert pool.used_bytes == 0


# ------------------------------------------------------ replaced on disk
def test_checkpoint_replaced_on_disk_is_reloaded(make_ckpt: Callable[..., Path]) -> None:
    ckpt = make_ckpt("a", 1.0)
    pool = HostPool(64 * MiB, pin=False)
    _assert_values(load(ckpt, pool=pool), 1.0)
    gc.collect()

    save_state_dict(_state_dict(2.0), ckpt, overwrite=True)
    fresh = load_with_info(ckpt, pool=pool)

    assert not fresh.hit
    assert fresh.stats is not None
    _assert_values(fresh.tensors, 2.0)


def test_tensors_of_a_replaced_checkpoint_keep_their_values(
    make_ckpt: Callable[..., Path],
) -> None:
    """Regression: the replaced entry's buffer was refilled while old tensors still viewed it."""
    ckpt = make_ckpt("a", 1.0)
    pool = HostPool(64 * MiB, pin=False)
    old = load(ckpt, pool=pool)

    save_state_dict(_state_dict(2.0), ckpt, overwrite=True)
    _assert_values(load(ckpt, pool=pool), 2.0)

    _assert_values(old, 1.0)


# ---------------------------------------------------------- single flight
def test_concurrent_pool_loads_share_one_read(
    make_ckpt: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = make_ckpt("a", 1.0)
    pool = HostPool(64 * MiB, pin=False)
    calls = _held_until_joined(monkeypatch, pool_mod, 8)

    results: list[LoadResult] = _run_threads(8, lambda: load_with_info(ckpt, pool=pool))

    assert all(isinstance(r, LoadResult) for r in results), results
    assert calls[0] == 1
    assert pool.misses == 1
    assert sum(r.stats is not None for r in results) == 1
    # Callers that waited for the one read are not hits: only memory already
    # resident at checkout counts (the invoker reports their tier from this).
    assert sum(r.hit for r in results) == pool.hits <= 7
    for r in results:
        _assert_values(r.tensors, 1.0)


def test_concurrent_plain_loads_share_one_read(
    make_ckpt: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = make_ckpt("a", 1.0)
    calls = _held_until_joined(monkeypatch, load_mod, 8)

    results: list[dict[str, torch.Tensor]] = _run_threads(8, lambda: load(ckpt))

    assert all(isinstance(r, dict) for r in results), results
    assert calls[0] == 1
    for r in results:
        _assert_values(r, 1.0)


def test_concurrent_loads_of_a_corrupted_checkpoint_all_fail(
    make_ckpt: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, slot: int
) -> None:
    bad = make_ckpt("bad", 1.0, chunk_size=4096)
    with open(bad / "data.0", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    pool = HostPool(2 * slot, pin=False)
    calls = _held_until_joined(monkeypatch, pool_mod, 4)

    results = _run_threads(4, lambda: load(bad, pool=pool))

    assert all(isinstance(r, ChecksumError) for r in results), results
    assert calls[0] == 1
    assert bad not in pool
    good = make_ckpt("good", 2.0)
    _assert_values(load(good, pool=pool), 2.0)  # the failed load's memory is usable again
    assert pool.used_bytes <= pool.capacity


# ----------------------------------------------------------------- module
def test_pool_module_compiles_without_warnings() -> None:
    """Regression: a '\\-' in the module docstring is an invalid escape (SyntaxWarning on 3.12+)."""
    spec = importlib.util.find_spec("sllm.native_loader._pool")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(source, spec.origin, "exec")

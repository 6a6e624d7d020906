"""The tier cache in-process: remote -> NVMe -> DRAM -> device, against a file and an S3 store."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sllm.core.errors import CorruptObject, InsufficientCapacity, StoreError
from sllm.invoker import Bandwidths, NvmeTier, TierCache, cache_key
from sllm.native_loader import HostPool, load, read_manifest
from sllm.store import ObjectInfo, PublishedModel, Store, open_store, push_model
from sllm.tiny_models import build_tiny_model

CHUNK = 16 * 1024


class CountingStore:
    """A Store wrapper that counts ranged GETs and can fail after a number of them."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.range_gets = 0
        self.bytes = 0
        self.fail_after: int | None = None
        self._lock = threading.Lock()

    def get_range_into(self, key: str, offset: int, view: memoryview) -> None:
        with self._lock:
            if self.fail_after is not None and self.range_gets >= self.fail_after:
                raise StoreError("simulated connection reset")
            self.range_gets += 1
            self.bytes += len(view)
        self.inner.get_range_into(key, offset, view)

    def stat(self, key: str) -> ObjectInfo | None:
        return self.inner.stat(key)

    def get_bytes(self, key: str) -> bytes:
        return self.inner.get_bytes(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.inner.get_range(key, offset, length)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.inner.put_bytes(key, data)

    def put_file(self, key: str, path: Path, *, progress: object = None) -> None:
        self.inner.put_file(key, path)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}")
    uri, settings = request.getfixturevalue("s3_store_uri")
    return open_store(uri, settings)


def publish(store: Store, tmp_path: Path, name: str = "tiny", seed: int = 0) -> PublishedModel:
    src = build_tiny_model("llama", tmp_path / f"hf-{name}-{seed}", seed=seed)
    return push_model(str(src), name, store, progress=False, chunk_size=CHUNK).model


def make_cache(
    store: Store, root: Path, *, nvme: int = 1 << 30, dram: int = 1 << 30, part_chunks: int = 2
) -> TierCache:
    return TierCache(
        store,
        NvmeTier(root, nvme),
        HostPool(dram, pin=False),
        Bandwidths(),
        download_concurrency=4,
        part_size=part_chunks * CHUNK,
    )


def reference(cache: TierCache, model: PublishedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load(cache.nvme.path(cache_key(model))).items()}


def test_cold_load_walks_down_the_tiers(store: Store, tmp_path: Path) -> None:
    model = publish(store, tmp_path)
    cache = make_cache(store, tmp_path / "cache")
    assert cache.locate(model) == "remote"
    tensors, how = cache.load(model, torch.device("cpu"))
    assert how.tier == "remote" and how.fetched == model.total_bytes - _small_bytes(model)
    assert cache.locate(model) == "dram"
    truth = reference(cache, model)
    assert set(tensors) == set(truth)
    assert all(torch.equal(tensors[k], truth[k]) for k in truth)
    # The NVMe copy is a complete, verified checkpoint.
    read_manifest(cache.nvme.path(cache_key(model)))
    del tensors
    again, how = cache.load(model, torch.device("cpu"))
    assert how.tier == "dram"
    assert not cache.evict_dram(model)  # tensors still view the DRAM copy
    del again
    assert cache.evict_dram(model)
    assert cache.locate(model) == "nvme"
    tensors, how = cache.load(model, torch.device("cpu"))
    assert how.tier == "nvme"
    assert all(torch.equal(tensors[k], truth[k]) for k in truth)


def test_a_loaded_model_does_not_fetch_its_small_files_again(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: after the weights were in memory, a second ensure_meta could fail the load."""
    import sllm.invoker._tiers as tiers_mod

    model = publish(store, tmp_path)
    cache = make_cache(store, tmp_path / "cache")
    calls: list[str] = []
    real = tiers_mod.ensure_meta

    def once(*args: Any) -> Path:
        calls.append(model.name)
        if len(calls) > 1:
            raise StoreError("the store is down (simulated)")
        return real(*args)

    monkeypatch.setattr(tiers_mod, "ensure_meta", once)
    tensors, how = cache.load(model, torch.device("cpu"))

    assert how.tier == "remote" and tensors and len(calls) == 1


def test_single_flight_downloads_once(store: Store, tmp_path: Path) -> None:
    model = publish(store, tmp_path)
    counting = CountingStore(store)
    cache = make_cache(counting, tmp_path / "cache")
    results: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            t, _ = cache.load(model, torch.device("cpu"))
            results.append(next(iter(t)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 6
    assert counting.bytes == model.total_bytes - _small_bytes(model)


def test_interrupted_download_resumes(store: Store, tmp_path: Path) -> None:
    model = publish(store, tmp_path)
    counting = CountingStore(store)
    cache = make_cache(counting, tmp_path / "cache", part_chunks=1)
    counting.fail_after = 3
    with pytest.raises(StoreError, match="simulated"):
        cache.load(model, torch.device("cpu"))
    assert cache.locate(model) == "remote"  # nothing half-done is visible
    assert not cache.nvme.path(cache_key(model)).exists()
    first = counting.range_gets
    counting.fail_after = None
    # A fresh invoker process over the same cache folder picks up the partial download.
    cache = make_cache(counting, tmp_path / "cache", part_chunks=1)
    tensors, how = cache.load(model, torch.device("cpu"))
    assert how.resumed > 0
    data = model.total_bytes - _small_bytes(model)
    assert how.fetched + how.resumed == data
    assert counting.range_gets - first < data // CHUNK  # not everything again
    truth = reference(cache, model)
    assert all(torch.equal(tensors[k], truth[k]) for k in truth)


def test_corrupt_nvme_chunk_is_detected_and_refetched(store: Store, tmp_path: Path) -> None:
    model = publish(store, tmp_path)
    cache = make_cache(store, tmp_path / "cache")
    tensors, _ = cache.load(model, torch.device("cpu"))
    truth = {k: v.clone() for k, v in tensors.items()}
    del tensors
    assert cache.evict_dram(model)
    data0 = cache.nvme.path(cache_key(model)) / "data.0"
    with open(data0, "r+b") as f:
        f.seek(CHUNK + 100)
        byte = f.read(1)
        f.seek(CHUNK + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.posix_fadvise(os.open(data0, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    tensors, how = cache.load(model, torch.device("cpu"))
    assert how.tier == "remote"  # the bad copy was dropped and fetched again
    assert all(torch.equal(tensors[k], truth[k]) for k in truth)
    cache.evict_dram(model)
    del tensors
    # The healed copy on NVMe is good again.
    fresh = load(cache.nvme.path(cache_key(model)))
    assert all(torch.equal(fresh[k], truth[k]) for k in truth)


def test_corrupt_store_object_is_never_served(store: Store, tmp_path: Path) -> None:
    model = publish(store, tmp_path)
    key = model.prefix + "data.0"
    blob = bytearray(store.get_bytes(key))
    blob[CHUNK * 2 + 7] ^= 0x55
    store.put_bytes(key, bytes(blob))
    cache = make_cache(store, tmp_path / "cache")
    with pytest.raises(CorruptObject, match=r"data\.0.*corrupt"):
        cache.load(model, torch.device("cpu"))
    assert cache.locate(model) == "remote"
    assert not cache.nvme.path(cache_key(model)).exists()
    assert cache.nvme.contents() == []


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["cut-in-half", "emptied"])
def test_object_truncated_after_push_is_corrupt_not_unavailable(
    store: Store, tmp_path: Path, keep: float
) -> None:
    model = publish(store, tmp_path)
    key = model.prefix + "data.0"
    blob = store.get_bytes(key)
    store.put_bytes(key, blob[: int(len(blob) * keep) + 100 * (keep > 0)])
    cache = make_cache(store, tmp_path / "cache")
    with pytest.raises(CorruptObject, match=r"data\.0 in the store is shorter than the \d+ bytes"):
        cache.load(model, torch.device("cpu"))
    assert cache.locate(model) == "remote"
    assert cache.nvme.contents() == []


def test_nvme_eviction_is_lru_and_spares_models_in_use(store: Store, tmp_path: Path) -> None:
    models = [publish(store, tmp_path, f"m{i}", seed=i) for i in range(3)]
    size = max(m.total_bytes for m in models)
    cache = make_cache(store, tmp_path / "cache", nvme=int(size * 2.5))
    for m in models[:2]:
        cache.load(m, torch.device("cpu"))
    keys = [cache_key(m) for m in models]
    # m0 is being read (held), so loading m2 must evict m1 even though m0 is older.
    with cache.nvme.use(keys[0]):
        cache.load(models[2], torch.device("cpu"))
        assert cache.nvme.contains(keys[0])
        assert not cache.nvme.contains(keys[1])
        assert cache.nvme.contains(keys[2])
    assert cache.nvme.used_bytes <= cache.nvme.capacity


def test_model_larger_than_dram_is_a_clear_error(store: Store, tmp_path: Path) -> None:
    model = publish(store, tmp_path)
    small_dram = make_cache(store, tmp_path / "c1", dram=model.total_bytes // 2)
    with pytest.raises(InsufficientCapacity, match="DRAM"):
        small_dram.load(model, torch.device("cpu"))


def test_model_larger_than_nvme_streams_to_memory_only(store: Store, tmp_path: Path) -> None:
    model = publish(store, tmp_path)
    cache = make_cache(store, tmp_path / "cache", nvme=model.total_bytes // 2)
    tensors, how = cache.load(model, torch.device("cpu"))
    assert how.tier == "remote" and how.fetched == model.total_bytes - _small_bytes(model)
    assert cache.locate(model) == "dram"
    assert cache.nvme.contents() == [] and cache.nvme.used_bytes == 0
    assert not any(cache.nvme.partial_dir.iterdir())
    roomy = make_cache(store, tmp_path / "roomy")
    truth, _ = roomy.load(model, torch.device("cpu"))
    assert all(torch.equal(tensors[k], truth[k]) for k in truth)


def _small_bytes(model: PublishedModel) -> int:
    return sum(f.size for f in model.files if not f.path.startswith("data."))

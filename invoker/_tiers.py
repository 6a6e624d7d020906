"""The tier cache: finds a model in the fastest tier holding it and streams it to the device.

    lookup order       source of the bytes             also fills
    DRAM (HostPool)    memory already there            -
    NVMe               FolderSource: O_DIRECT reads    DRAM
    remote (store)     RemoteSource: ranged GETs       NVMe and DRAM, in one pass

In every case the chunks flow on to the device as they land (the loader's
CUDA pipelines); on the CPU the tensors are views of the DRAM copy.
A checksum failure while reading the NVMe copy discards that copy and the
load falls through to the store, so corruption on local disk heals itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sllm.core.errors import InsufficientCapacity, Unavailable
from sllm.native_loader import (
    CapacityError,
    FolderSource,
    HostMemory,
    HostPool,
    LoaderError,
    Manifest,
    OnChunk,
    ReadStats,
    load_with_info,
    read_manifest,
)
from sllm.store import PublishedModel, Store, read_published

from ._bandwidth import Bandwidths
from ._download import RemoteSource, cache_key, ensure_meta
from ._nvme import NvmeTier

log = logging.getLogger("sllm.invoker")


@dataclass(frozen=True)
class TierLoad:
    """How one load went: the tier it came from, time, bytes, and what the store sent."""

    tier: str  # dram | nvme | remote
    seconds: float
    nbytes: int
    meta: Path  # the local folder with config, tokenizer and manifest
    fetched: int = 0
    resumed: int = 0


class NvmeSource:
    """A HostSource reading the verified NVMe copy, held against eviction while read."""

    kind = "nvme"

    def __init__(self, nvme: NvmeTier, key: str, meta: Path, threads: int) -> None:
        self.nvme = nvme
        self.key = key
        self.meta = meta
        self.threads = threads
        self.stats: ReadStats | None = None
        self._manifest: Manifest | None = None

    def manifest(self) -> Manifest:
        """The manifest from the meta folder (identical to the NVMe copy's), read once."""
        if self._manifest is None:
            self._manifest = read_manifest(self.meta)
        return self._manifest

    def read_into(self, buffers: Sequence[HostMemory], on_chunk: OnChunk | None) -> ReadStats:
        """Read and verify the NVMe copy into `buffers`; a bad copy raises NvmeCopyFailed."""
        try:
            with self.nvme.use(self.key) as folder:
                source = FolderSource(folder, "always", self.threads)
                self.stats = source.read_into(buffers, on_chunk)
        except KeyError:
            raise NvmeCopyFailed(f"{self.key} left the NVMe tier before it was read") from None
        except LoaderError as exc:  # checksum, short or missing file, unreadable manifest
            raise NvmeCopyFailed(f"NVMe copy of {self.key} is unusable: {exc}") from exc
        return self.stats


class NvmeCopyFailed(Exception):
    """The NVMe copy vanished or failed verification; the store has the truth."""


class HostMemoryShort(InsufficientCapacity):
    """The DRAM tier cannot take the model now: what it holds is in use.

    The one shortage that unloading idle instances can cure on a CPU host,
    where an instance's weights are its DRAM copy.
    """


class TierCache:
    """Remote -> NVMe -> DRAM -> device, with single-flight loads and self-healing copies."""

    def __init__(
        self,
        store: Store,
        nvme: NvmeTier,
        pool: HostPool,
        bandwidths: Bandwidths,
        *,
        download_concurrency: int = 8,
        part_size: int = 16 << 20,
        read_threads: int = 16,
    ) -> None:
        self.store = store
        self.nvme = nvme
        self.pool = pool
        self.bandwidths = bandwidths
        self.download_concurrency = download_concurrency
        self.part_size = part_size
        self.read_threads = read_threads

    def resolve(self, name: str) -> PublishedModel:
        """The currently published version of `name` (NotFound when unpublished)."""
        return read_published(self.store, name)

    def meta(self, model: PublishedModel) -> Path:
        """The local folder with the model's config, tokenizer and manifest."""
        try:
            return ensure_meta(self.store, model, self.nvme)
        except OSError as exc:  # a model is built from these files: no load without them
            raise Unavailable(
                f"the invoker's cache folder {self.nvme.root} is unusable: {exc}"
            ) from exc

    def locate(self, model: PublishedModel) -> str:
        """The fastest tier holding `model` on this host: dram, nvme or remote."""
        key = cache_key(model)
        if self.nvme.path(key) in self.pool:
            return "dram"
        return "nvme" if self.nvme.contains(key) else "remote"

    def load(
        self, model: PublishedModel, device: torch.device
    ) -> tuple[dict[str, torch.Tensor], TierLoad]:
        """The model's tensors on `device`, from the fastest tier that has them."""
        key = cache_key(model)
        meta = self.meta(model)
        pool_key = self.nvme.path(key)  # names immutable content: the digest is in it
        if model.total_bytes > self.pool.capacity:
            raise InsufficientCapacity(
                f"model {model.name!r} needs {model.total_bytes} bytes of host memory; "
                f"the DRAM tier holds {self.pool.capacity}"
            )
        start = time.perf_counter()
        for attempt in range(2):
            source: NvmeSource | RemoteSource
            if attempt == 0 and self.nvme.contains(key):
                source = NvmeSource(self.nvme, key, meta, self.read_threads)
            else:
                source = RemoteSource(
                    self.store,
                    model,
                    self.nvme,
                    concurrency=self.download_concurrency,
                    part_size=self.part_size,
                )
            try:
                result = load_with_info(pool_key, device, pool=self.pool, source=source)
                break
            except NvmeCopyFailed as exc:
                log.warning("%s; fetching it from the store again", exc)
                self.nvme.discard(key)
            except CapacityError as exc:
                raise HostMemoryShort(f"DRAM tier: {exc}") from exc
        else:  # unreachable: the second attempt always reads from the store
            raise RuntimeError(f"load of {key} found no source")
        seconds = time.perf_counter() - start
        if not (meta / "config.json").is_file():  # the cache folder was deleted meanwhile
            meta = self.meta(model)  # (an error here fails a load whose weights are in memory)
        if result.hit:
            if device.type == "cuda":  # a DRAM hit on a GPU is a pure host->device copy
                self.bandwidths.observe("host_to_device", model.total_bytes, seconds)
            return result.tensors, TierLoad("dram", seconds, model.total_bytes, meta)
        if isinstance(source, RemoteSource):
            s = source.stats
            self.bandwidths.observe("network", s.fetched, s.seconds)
            return result.tensors, TierLoad(
                "remote", seconds, model.total_bytes, meta, s.fetched, s.resumed
            )
        if source.stats is not None:
            self.bandwidths.observe("disk", source.stats.nbytes, source.stats.seconds)
        return result.tensors, TierLoad("nvme", seconds, model.total_bytes, meta)

    def evict_dram(self, model: PublishedModel) -> bool:
        """Drop the model's DRAM copy when nothing uses it."""
        return self.pool.evict(self.nvme.path(cache_key(model)))

    def dram_contents(self) -> list[dict[str, object]]:
        """Every checkpoint resident in DRAM: key, bytes, in use."""
        return [
            {"key": Path(k).name, "bytes": n, "in_use": used} for k, n, used in self.pool.resident()
        ]

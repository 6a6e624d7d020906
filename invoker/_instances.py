"""The device tier: loaded model instances, one per function, single-flight loads.

States of an instance:

    absent --ensure (cold: tier load + build)--> ready --unload (idle)--> absent
    absent --ensure fails--> absent (every waiter gets the error)

Data: the function spec, the published model version, the runtime (model +
tokenizer + concurrency slots), where it was loaded from, last use.
Events: ensure (hit, join a load in flight, or start one), unload, device
pressure (idle instances are unloaded least recently used first).

Unloading drops the device copy only: on a GPU the DRAM copy stays in the
pool, and on the CPU the instance's tensors were views of that very DRAM
copy, which becomes idle and stays resident while capacity allows.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sllm.core.errors import Conflict, FunctionError, InsufficientCapacity, NotFound
from sllm.core.messages import FunctionSpec, LoadReport
from sllm.native_loader import FormatError, build_model
from sllm.runtime import Runtime, load_tokenizer, model_class_for
from sllm.store import PublishedModel

from ._tiers import HostMemoryShort, TierCache, TierLoad

GPU_HEADROOM = 1.15  # weights plus activations / KV cache for a few requests


@dataclass
class Instance:
    """A model ready on a device for one function."""

    spec: FunctionSpec
    model: PublishedModel
    runtime: Runtime
    device: torch.device
    report: LoadReport
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """Status view."""
        return {
            "function": self.spec.function,
            "model": self.model.name,
            "digest": self.model.digest,
            "task": self.spec.task,
            "device": str(self.device),
            "bytes": self.model.total_bytes,
            "concurrency": self.runtime.concurrency,
            "active": self.runtime.active(),
            "loaded_from": self.report.tier,
            "load_seconds": self.report.load_seconds,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
        }


def kv_budget(device: torch.device, dram_capacity: int, configured: int | None) -> int:
    """An instance's KV cache budget: as configured, else a quarter of the DRAM tier on the
    CPU, or half the device memory free once the model is loaded on a GPU."""
    if configured:
        return configured
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.5)
    return max(1, dram_capacity // 4)


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.instance: Instance | None = None
        self.error: BaseException | None = None


class Instances:
    """Model instances by function, loading through the tier cache on a miss."""

    def __init__(
        self,
        tiers: TierCache,
        device: torch.device,
        *,
        queue_timeout: float = 30.0,
        batching: bool = True,
        kv_cache_bytes: int | None = None,
        dram_capacity: int = 16 << 30,
        prefill_chunk: int = 256,
    ) -> None:
        self.tiers = tiers
        self.device = device
        self.queue_timeout = queue_timeout
        self.batching = batching
        self.kv_cache_bytes = kv_cache_bytes
        self.dram_capacity = dram_capacity
        self.prefill_chunk = prefill_chunk
        self._lock = threading.Lock()
        self._ready: dict[str, Instance] = {}
        self._loading: dict[str, _Flight] = {}
        self._admission = threading.Lock()

    def get(self, function: str) -> Instance | None:
        """The ready instance of `function`, if any."""
        with self._lock:
            return self._ready.get(function)

    def ensure(self, spec: FunctionSpec, *, refresh: bool = False) -> tuple[Instance, LoadReport]:
        """A ready instance for `spec`: warm if loaded, else one load shared by all callers.

        `refresh` re-reads the published pointer (before taking any lock: it
        is a store round trip) and reloads when the model was re-pushed.
        """
        latest = self.tiers.resolve(spec.model).digest if refresh else None
        while True:
            with self._lock:
                inst = self._ready.get(spec.function)
                if inst is not None and self._matches(inst, spec, latest):
                    inst.last_used = time.time()
                    warm = LoadReport(
                        spec.function,
                        inst.model.name,
                        inst.model.digest,
                        "gpu",
                        False,
                        0.0,
                        inst.model.total_bytes,
                        str(self.device),
                    )
                    return inst, warm
                flight = self._loading.get(spec.function)
                leader = flight is None
                if flight is None:
                    flight = self._loading[spec.function] = _Flight()
            if leader:
                return self._lead(spec, flight)
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            # loop: the instance is ready now (or was replaced by a newer spec)

    @staticmethod
    def _matches(inst: Instance, spec: FunctionSpec, latest: str | None) -> bool:
        same = (inst.spec.model, inst.spec.task, inst.spec.concurrency) == (
            spec.model,
            spec.task,
            spec.concurrency,
        )
        return same and (latest is None or latest == inst.model.digest)

    def _lead(self, spec: FunctionSpec, flight: _Flight) -> tuple[Instance, LoadReport]:
        try:
            old = self.get(spec.function)
            if old is not None:
                self._unload(spec.function, force=False)
            inst = self._load(spec)
            flight.instance = inst
            with self._lock:
                self._ready[spec.function] = inst
            return inst, inst.report
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._loading[spec.function]
            flight.done.set()

    def _load(self, spec: FunctionSpec) -> Instance:
        start = time.perf_counter()  # the load counts from the pointer read on
        model = self.tiers.resolve(spec.model)
        # On a GPU, admission is one at a time: two loads must not both count
        # the same free memory.
        with self._admission if self.device.type == "cuda" else contextlib.nullcontext():
            self._make_room(model)
            try:
                tensors, tier = self._load_tensors(model)
            except torch.cuda.OutOfMemoryError as exc:
                raise InsufficientCapacity(
                    f"model {model.name!r} does not fit in {self.device}'s free memory: {exc}"
                ) from exc
        # Building the skeleton and the tokenizer stays on this thread after the
        # read: transformers' lazy imports are not safe to race on a first load.
        meta = tier.meta
        try:
            built = build_model(meta, tensors, self.device, cls=model_class_for(meta, spec.task))
            tokenizer = load_tokenizer(meta)
        except torch.cuda.OutOfMemoryError as exc:
            raise InsufficientCapacity(f"model {model.name!r} ran out of device memory") from exc
        except (FormatError, OSError, ValueError) as exc:
            raise FunctionError(f"model {model.name!r} cannot be built: {exc}") from exc
        runtime = Runtime(
            built,
            tokenizer,
            meta,
            task=spec.task,
            concurrency=spec.concurrency,
            queue_timeout=self.queue_timeout,
            batching=self.batching,
            kv_cache_bytes=kv_budget(self.device, self.dram_capacity, self.kv_cache_bytes),
            prefill_chunk=self.prefill_chunk,
        )
        report = LoadReport(
            spec.function,
            model.name,
            model.digest,
            tier.tier,
            True,
            time.perf_counter() - start,
            model.total_bytes,
            str(self.device),
            tier.fetched,
            tier.resumed,
        )
        return Instance(spec, model, runtime, self.device, report)

    def _load_tensors(self, model: PublishedModel) -> tuple[dict[str, torch.Tensor], TierLoad]:
        """Load through the tiers; on the CPU, unload idle instances while DRAM is short.

        On the CPU an instance's weights are its DRAM copy, so an idle
        instance pins DRAM that a new model may need, as it pins device
        memory on a GPU. No other shortage is cured by unloading.
        """
        while True:
            try:
                return self.tiers.load(model, self.device)
            except HostMemoryShort:
                if (
                    self.device.type != "cpu"
                    or model.total_bytes > self.tiers.pool.capacity
                    or not self._unload_idle()
                ):
                    raise

    def _make_room(self, model: PublishedModel) -> None:
        """On a GPU, unload idle instances (least recently used first) until the model fits."""
        if self.device.type != "cuda":
            return
        need = int(model.total_bytes * GPU_HEADROOM)
        while torch.cuda.mem_get_info(self.device)[0] < need:
            if not self._unload_idle():
                free = torch.cuda.mem_get_info(self.device)[0]
                raise InsufficientCapacity(
                    f"model {model.name!r} needs about {need} bytes on {self.device}; "
                    f"{free} are free and every loaded instance is busy"
                )

    def _unload_idle(self) -> bool:
        """Unload the least recently used idle instance; False when every one is busy."""
        with self._lock:
            idle = sorted(
                (i for i in self._ready.values() if i.runtime.active() == 0),
                key=lambda i: i.last_used,
            )
        for victim in idle:
            try:
                self._unload(victim.spec.function, force=False)
                return True
            except (Conflict, NotFound):  # it got busy, or someone else unloaded it
                continue
        return False

    def unload(self, function: str) -> Instance:
        """Drop `function`'s instance from the device (NotFound / Conflict when busy)."""
        return self._unload(function, force=False)

    def _unload(self, function: str, *, force: bool) -> Instance:
        with self._lock:
            inst = self._ready.get(function)
            if inst is None:
                raise NotFound(f"function {function!r} has no loaded instance")
            if inst.runtime.active() and not force:
                raise Conflict(
                    f"function {function!r} has {inst.runtime.active()} requests running"
                )
            del self._ready[function]
        inst.runtime.close()
        gc.collect()  # drop the tensors now, so the DRAM copy turns idle at once
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return inst

    def close(self) -> None:
        """Drop every instance (shutdown)."""
        with self._lock:
            names = list(self._ready)
        for name in names:
            self._unload(name, force=True)

    def to_json(self) -> list[dict[str, Any]]:
        """Every ready instance, and the loads in flight."""
        with self._lock:
            ready = [i.to_json() for i in self._ready.values()]
            loading = [{"function": f, "loading": True} for f in self._loading]
        return ready + loading

    def queue_length(self) -> int:
        """Loads in flight."""
        with self._lock:
            return len(self._loading)

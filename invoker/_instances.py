"""The device tier: loaded model instances by instance id, single-flight loads.

An instance is named by the id the controller assigned it (the "instance"
field of load / invoke / unload bodies) and the function's version. Two
instances of one function may sit side by side (a migration target on the
same host); an unload names exactly one. A request without an id (direct
use, tests) gets one derived from its function: "{function}" alone, or
"{function}@{version}" when it names a version, so such requests share one
instance per function and version, as before ids existed.

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
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sllm.core.errors import Conflict, FunctionError, InsufficientCapacity, InvalidRequest, NotFound
from sllm.core.messages import FunctionSpec, LoadReport, show_value
from sllm.core.numbers import is_int
from sllm.native_loader import FormatError, build_model
from sllm.runtime import Runtime, load_tokenizer, model_class_for
from sllm.store import PublishedModel

from ._tiers import HostMemoryShort, TierCache, TierLoad

GPU_HEADROOM = 1.15  # weights plus activations / KV cache for a few requests
INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:/-]{0,299}")
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_VERSION = 2**63 - 1

Version = int | str | None


@dataclass(frozen=True)
class InstanceName:
    """Which instance a request means: its id and the function version it runs."""

    id: str
    version: Version = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], function: str) -> InstanceName:
        """The body's "instance" and "version"; without an id, one derived from `function`."""
        version = doc.get("version")
        if version is not None and not (
            (is_int(version) and 0 <= version <= MAX_VERSION)
            or (isinstance(version, str) and VERSION.fullmatch(version))
        ):
            raise InvalidRequest(
                "'version' must be an integer >= 0 or 1-64 letters, digits, . _ -; "
                f"got {show_value(version)}",
                param="version",
            )
        given = doc.get("instance")
        if given is None:
            return cls(function if version is None else f"{function}@{version}", version)
        if not isinstance(given, str) or not INSTANCE_ID.fullmatch(given):
            raise InvalidRequest(
                f"'instance' must be 1-300 letters, digits, . _ @ : / -; got {show_value(given)}",
                param="instance",
            )
        return cls(given, version)


@dataclass
class Instance:
    """A model ready on a device for one function, under its instance id."""

    spec: FunctionSpec
    model: PublishedModel
    runtime: Runtime
    device: torch.device
    report: LoadReport
    name: InstanceName
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        """The instance id."""
        return self.name.id

    def to_json(self) -> dict[str, Any]:
        """Status view."""
        return {
            "instance": self.name.id,
            "version": self.name.version,
            "function": self.spec.function,
            "model": self.model.name,
            "digest": self.model.digest,
            "task": self.spec.task,
            "device": str(self.device),
            "bytes": self.model.total_bytes,
            "concurrency": self.runtime.concurrency,
            "active": self.runtime.active(),
            "kv_rows": self.runtime.kv_rows(),
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
    def __init__(self, function: str) -> None:
        self.function = function
        self.done = threading.Event()
        self.instance: Instance | None = None
        self.error: BaseException | None = None


class Instances:
    """Model instances by instance id, loading through the tier cache on a miss."""

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

    def get(self, instance: str) -> Instance | None:
        """The ready instance with id `instance` (for direct use: a function's name), if any."""
        with self._lock:
            return self._ready.get(instance)

    def of_function(self, function: str) -> list[Instance]:
        """The ready instances of `function`."""
        with self._lock:
            return [i for i in self._ready.values() if i.spec.function == function]

    def ensure(
        self, spec: FunctionSpec, name: InstanceName | None = None, *, refresh: bool = False
    ) -> tuple[Instance, LoadReport]:
        """A ready instance `name` for `spec`: warm if loaded, else one load shared by all callers.

        Without `name` the instance id is derived from the function (see
        InstanceName). An instance under that id running another function,
        model or version is replaced (Conflict while it has requests).
        `refresh` re-reads the published pointer (before taking any lock: it
        is a store round trip) and reloads when the model was re-pushed.
        """
        name = name or InstanceName(spec.function)
        latest = self.tiers.resolve(spec.model).digest if refresh else None
        while True:
            with self._lock:
                inst = self._ready.get(name.id)
                if inst is not None and self._matches(inst, spec, name, latest):
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
                flight = self._loading.get(name.id)
                leader = flight is None
                if flight is None:
                    flight = self._loading[name.id] = _Flight(spec.function)
            if leader:
                return self._lead(spec, name, flight)
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            # loop: the instance is ready now (or was replaced by a newer spec)

    @staticmethod
    def _matches(
        inst: Instance, spec: FunctionSpec, name: InstanceName, latest: str | None
    ) -> bool:
        same = (
            inst.spec.function,
            inst.spec.model,
            inst.spec.task,
            inst.spec.concurrency,
            inst.name.version,
        ) == (spec.function, spec.model, spec.task, spec.concurrency, name.version)
        return same and (latest is None or latest == inst.model.digest)

    def _lead(
        self, spec: FunctionSpec, name: InstanceName, flight: _Flight
    ) -> tuple[Instance, LoadReport]:
        try:
            old = self.get(name.id)
            if old is not None:
                self._unload(name.id, force=False)
            inst = self._load(spec, name)
            flight.instance = inst
            with self._lock:
                self._ready[name.id] = inst
            return inst, inst.report
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._loading[name.id]
            flight.done.set()

    def _load(self, spec: FunctionSpec, name: InstanceName) -> Instance:
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
        return Instance(spec, model, runtime, self.device, report, name)

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
                self._unload(victim.id, force=False)
                return True
            except (Conflict, NotFound):  # it got busy, or someone else unloaded it
                continue
        return False

    def unload(self, instance: str, *, force: bool = False) -> Instance:
        """Drop instance `instance` from the device (NotFound; Conflict when busy unless
        `force`: then its running requests fail with Unavailable)."""
        return self._unload(instance, force=force)

    def unload_function(self, function: str) -> Instance:
        """Drop the one instance of `function`; Conflict naming them when it has several."""
        with self._lock:
            ids = sorted(i.id for i in self._ready.values() if i.spec.function == function)
        if not ids:
            raise NotFound(f"function {function!r} has no loaded instance")
        if len(ids) > 1:
            raise Conflict(
                f"function {function!r} has {len(ids)} loaded instances ({', '.join(ids)}); "
                "name one with 'instance'"
            )
        return self._unload(ids[0], force=False)

    def _unload(self, instance: str, *, force: bool) -> Instance:
        with self._lock:
            inst = self._ready.get(instance)
            if inst is None:
                raise NotFound(f"no loaded instance {instance!r}")
            if inst.runtime.active() and not force:
                raise Conflict(
                    f"instance {instance!r} of {inst.spec.function!r} has "
                    f"{inst.runtime.active()} requests running"
                )
            del self._ready[instance]
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
            loading = [
                {"instance": i, "function": f.function, "loading": True}
                for i, f in self._loading.items()
            ]
        return ready + loading

    def queue_length(self) -> int:
        """Loads in flight."""
        with self._lock:
            return len(self._loading)

"""The invoker's core, without HTTP: tiers, instances, generations, invoke / embed, status."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Mapping
from typing import Any

import httpx
import torch

from sllm.core.errors import Conflict, InvalidRequest, NotFound, SllmError, Unavailable
from sllm.core.messages import (
    MAX_EMBED_INPUTS,
    FunctionSpec,
    LoadReport,
    embedding_inputs,
    field_int,
    require_object,
    show_value,
)
from sllm.native_loader import HostPool
from sllm.runtime import SamplingParams
from sllm.store import Store, open_store

from . import _stream
from ._bandwidth import Bandwidths, measure_disk, measure_host_to_device, measure_network
from ._cachelock import CacheLock
from ._config import InvokerConfig
from ._download import cache_key
from ._drain import Drain
from ._feed import Feed
from ._generations import Entry, Generations, generation_id
from ._holds import Holds, held_prompt
from ._instances import Instance, InstanceName, Instances
from ._metrics import InvokerMetrics
from ._nvme import NvmeTier
from ._states import check_state
from ._tiers import TierCache

log = logging.getLogger("sllm.invoker")

MAX_N = 128  # choices per request (OpenAI's limit)
SEED_SPACE = 2**63  # SamplingParams seeds are in [0, 2**63 - 1]


def resolve_device(name: str) -> torch.device:
    """The device an invoker runs models on: "auto" is cuda:0 when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} requested but CUDA is not available")
    return device


class Invoker:
    """One host's agent: keeps models warm across tiers and runs requests on them."""

    def __init__(
        self,
        config: InvokerConfig,
        *,
        store: Store | None = None,
        cache_lock: CacheLock | None = None,
    ) -> None:
        """Claim the cache folder (unless `cache_lock` already holds it) and build the tiers."""
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        self.store = (
            store if store is not None else open_store(config.store_uri, config.store_settings)
        )
        # Claimed before the NVMe tier scans and tidies the folder.
        self._owned_lock = None if cache_lock is not None else CacheLock.acquire(config.cache_dir)
        try:  # whatever fails from here on, the folder is not left locked until exit
            self.nvme = NvmeTier(
                config.cache_dir, config.nvme_capacity, lock=cache_lock or self._owned_lock
            )
            self.pool = HostPool(config.dram_capacity, pin=self.device.type == "cuda")
            self.bandwidths = Bandwidths()
            self.tiers = TierCache(
                self.store,
                self.nvme,
                self.pool,
                self.bandwidths,
                download_concurrency=config.download_concurrency,
                part_size=config.part_size,
            )
            self.instances = Instances(
                self.tiers,
                self.device,
                queue_timeout=config.queue_timeout,
                batching=config.batching,
                kv_cache_bytes=config.kv_cache_bytes or None,
                dram_capacity=config.dram_capacity,
                prefill_chunk=config.prefill_chunk,
            )
            self.generations = Generations()
            self.drain = Drain(config.drain_grace)
            self.metrics = InvokerMetrics(self)
            self.generations.on_expire = self.metrics.hold_expired.inc
            self.holds = Holds(self.generations, self.metrics, config.hold_timeout)
        except BaseException:
            self._release_lock()
            raise
        self.started_at = time.time()
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._beat_now = threading.Event()  # send the next heartbeat at once

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Import the model machinery, measure bandwidths (when configured), become ready."""
        # transformers imports its model and tokenizer machinery lazily (about 2 s on a
        # small CPU host): paid here, at start-up, not by the first cold start.
        from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

        del AutoConfig, AutoTokenizer, PreTrainedModel
        if self.config.measure_bandwidth:
            self.measure_bandwidths()
        self._ready.set()
        if self.config.controller_url:
            threading.Thread(target=self._heartbeats, name="sllm-heartbeat", daemon=True).start()

    def _heartbeats(self) -> None:
        """Register with the controller and report status every heartbeat interval (and at
        once when the drain begins)."""
        url = self.config.controller_url.rstrip("/") + "/internal/v1/invokers/heartbeat"
        headers = {"Authorization": f"Bearer {self.config.token}"}
        warned = False
        with httpx.Client(headers=headers, timeout=5.0) as client:
            while not self._closing.is_set():
                self._beat_now.clear()
                body = {
                    "name": self.config.public_name,
                    "url": self.config.public_url,
                    "device": str(self.device),
                    "capacity": {
                        "nvme_bytes": self.config.nvme_capacity,
                        "dram_bytes": self.config.dram_capacity,
                    },
                    "draining": self.drain.report(),
                    "status": self.status(),
                }
                try:
                    client.post(url, json=body).raise_for_status()
                    warned = False
                except httpx.HTTPError as exc:
                    if not warned:
                        log.warning("heartbeat to %s failed: %s", url, exc)
                        warned = True
                self._beat_now.wait(self.config.heartbeat_interval)

    def ready(self) -> bool:
        """Whether start-up finished."""
        return self._ready.is_set()

    def measure_bandwidths(self) -> None:
        """Probe disk (O_DIRECT), host->device and store bandwidth; a failed probe is logged."""
        try:
            self.bandwidths.set("disk", measure_disk(self.config.cache_dir))
        except OSError as exc:
            log.warning("disk bandwidth probe failed: %s", exc)
        if self.device.type == "cuda":
            self.bandwidths.set("host_to_device", measure_host_to_device())
        try:
            self.bandwidths.set("network", measure_network(self._probe_fetch))
        except SllmError as exc:
            log.warning("store bandwidth probe failed: %s", exc)

    def _probe_fetch(self, limit: int) -> int:
        objects = [o for o in self.store.list("models/") if o.key.rsplit("/", 1)[-1] == "data.0"]
        if not objects:
            return 0
        biggest = max(objects, key=lambda o: o.size)
        return len(self.store.get_range(biggest.key, 0, min(limit, biggest.size)))

    def close(self) -> None:
        """Stop heartbeating and unload everything (shutdown)."""
        self._closing.set()
        self._beat_now.set()
        self.instances.close()
        self._release_lock()

    def drain_then(self, stop: Callable[[], None]) -> None:
        """SIGTERM: drain (see _drain), then call `stop` (the server's own shutdown).

        Returns at once; a thread waits. What still runs when the grace ran out
        is cut (its instance unloaded, its stream ends with an error) so the
        server's own shutdown does not wait for it again.
        """
        if not self.drain.begin():
            return
        log.info("draining: no new work; waiting up to %.0f s", self.drain.grace_s)
        self._beat_now.set()  # the controller hears of it now, not a heartbeat later

        def run() -> None:
            left = self.drain.wait(lambda: len(self.generations.running()))
            if left:
                log.warning("drain: the grace ran out with %d requests running; cutting them", left)
                self.instances.close()
            else:
                log.info("drained: nothing runs; stopping")
            stop()

        threading.Thread(target=run, name="sllm-drain", daemon=True).start()

    def _release_lock(self) -> None:
        if self._owned_lock is not None:
            self._owned_lock.release()

    # ---------------------------------------------------------------- models
    def load(self, body: Any) -> LoadReport:
        """Make `body`'s function ready on the device, re-reading the published version."""
        spec = self._spec(body)
        name = InstanceName.from_json(body, spec.function)
        _, report = self.instances.ensure(spec, name, refresh=True)
        self.metrics.observe_load(report)
        return report

    def loaded_name(self, body: Any) -> dict[str, Any]:
        """The instance id and version a load body names (derived when it names none)."""
        doc = require_object(body)
        name = InstanceName.from_json(doc, str(doc.get("function")))
        return {"instance": name.id, "version": name.version}

    def unload(
        self, function: str | None = None, *, instance: str | None = None, force: bool = False
    ) -> dict[str, Any]:
        """Drop one instance from the device; its DRAM copy stays while room allows.

        By `instance` id; by `function` only while that function has exactly
        one instance here (Conflict naming them otherwise). A busy instance is
        a Conflict, unless `force` (a drain whose grace ran out): then what
        runs on it ends with an error.
        """
        if instance is not None:
            found = self.instances.get(instance)
            if found is not None and function is not None and found.spec.function != function:
                raise NotFound(f"instance {instance!r} is not an instance of {function!r}")
            inst = self.instances.unload(instance, force=force)
        elif function is not None:
            inst = self.instances.unload_function(function)
        else:
            raise InvalidRequest("give 'instance' (or 'function' when it has one instance)")
        return {
            "instance": inst.id,
            "version": inst.name.version,
            "function": inst.spec.function,
            "model": inst.model.name,
            "unloaded": True,
        }

    def evict(self, body: Any) -> dict[str, Any]:
        """Drop a model's copy from the DRAM or NVMe tier (409 while in use, 404 when absent)."""
        doc = require_object(body)
        tier = doc.get("tier")
        if tier not in ("dram", "nvme"):
            raise InvalidRequest(f"'tier' must be 'dram' or 'nvme', got {tier!r}")
        name = doc.get("model")
        if not isinstance(name, str):
            raise InvalidRequest("'model' must be a published model name")
        model = self.tiers.resolve(name)
        key = cache_key(model)
        present = self.tiers.locate(model) == "dram" if tier == "dram" else self.nvme.contains(key)
        if not present:
            raise NotFound(f"model {name!r} is not in the {tier} tier")
        done = self.tiers.evict_dram(model) if tier == "dram" else self.nvme.evict(key)
        if not done:
            raise Conflict(f"model {name!r} is in use in the {tier} tier")
        return {"model": name, "tier": tier, "evicted": True}

    # -------------------------------------------------------------- requests
    def invoke(self, body: Any) -> tuple[LoadReport, Generator[dict[str, Any], None, None]]:
        """Validate, make the instance ready, and return the event stream of the generation(s).

        Validation that needs no model happens before any load, so a bad
        request never costs a cold start. The stream's events are described
        in `_stream`: start, token..., finish per choice, done (or error).
        """
        received = time.perf_counter()
        doc = require_object(body)
        spec = self._spec(doc)
        if spec.task != "generate":
            raise InvalidRequest(f"function {spec.function!r} is an {spec.task} function")
        name = InstanceName.from_json(doc, spec.function)
        gen_id = generation_id(doc)
        n = _field_n(doc)
        resumable = _field_resumable(doc)
        # The function's own limit comes from the controller; this host's caps it.
        cap = self.config.max_tokens_limit
        limit = min(field_int(doc, "max_tokens_limit", cap, 1, 2**31 - 1), cap)
        params = SamplingParams.from_request(doc, max_tokens_limit=limit)
        prompt_param = _check_prompt(doc)
        for attempt in range(2):
            inst, report = self.instances.ensure(spec, name)
            tokens = _prompt_tokens(inst, doc)
            try:
                # Fitted to the context, then prefilled: the first forward pass.
                gens = _start(inst, tokens, params, n, prompt_param, gen_id)
                break
            except Unavailable:  # unloaded between ensure and start: load it again
                if attempt:
                    raise
        self.metrics.observe_load(report)
        ids = [gen_id] if n == 1 else [f"{gen_id}.{i}" for i in range(n)]
        entries = self._register(inst, ids, gens)
        stream = _stream.events(
            self.generations,
            entries,
            report=report,
            metrics=self.metrics,
            prompt_tokens=len(tokens),
            received=received,
            gen_id=gen_id,
            resumable=resumable,
        )
        return report, self._feed(entries, _touching(inst, stream), resumable)

    def resume(self, body: Any) -> tuple[LoadReport, Generator[dict[str, Any], None, None]]:
        """Continue a generation from its exported state, streaming like `invoke`.

        A hostile or corrupt state is an InvalidRequest naming the field, checked
        in time bounded by the context length (sizes first, then the runtime's parse).
        With "hold": true it is a migration target (see _holds): prefilled from the
        state, registered as held, decoding nothing until its continue.
        """
        received = time.perf_counter()
        doc = require_object(body)
        spec = self._spec(doc)
        if spec.task != "generate":
            raise InvalidRequest(f"function {spec.function!r} is an {spec.task} function")
        name = InstanceName.from_json(doc, spec.function)
        state = check_state(doc.get("state"))
        gen_id = generation_id(doc, state.get("id"))
        choice = _field_choice(doc)
        resumable = _field_resumable(doc)
        hold = _field_hold(doc)
        if hold and (state.get("finished") or state.get("finish_reason") is not None):
            raise InvalidRequest(
                "a finished generation cannot be held as a migration target (resume it "
                "without 'hold')",
                param="state.finished",
            )
        for attempt in range(2):
            inst, report = self.instances.ensure(spec, name)
            if len(state["tokens"]) > inst.runtime.max_context:
                raise InvalidRequest(
                    f"'state.tokens' holds {len(state['tokens'])} tokens, more than the "
                    f"context of {inst.runtime.max_context}",
                    param="state.tokens",
                )
            try:
                gen = inst.runtime.resume(state, hold=hold)
                break
            except Unavailable:  # unloaded between ensure and resume: load it again
                if attempt:
                    raise
        self.metrics.observe_load(report)
        held = (held_prompt(state), self.config.hold_timeout) if hold else None
        entries = self._register(inst, [gen_id], [gen], first_choice=choice, held=held)
        stream = _stream.events(
            self.generations,
            entries,
            report=report,
            metrics=self.metrics,
            prompt_tokens=gen.prompt_len,
            received=received,
            gen_id=gen_id,
            resumed=len(gen.generated),
            resumable=resumable,
            held=hold,
        )
        return report, self._feed(entries, _touching(inst, stream), resumable)

    def _feed(
        self,
        entries: list[Entry],
        stream: Generator[dict[str, Any], None, None],
        resumable: bool,
    ) -> Generator[dict[str, Any], None, None]:
        """A resumable stream outlives its reader for `detach_grace` seconds (see _feed):
        its entries carry the feed a later reader attaches to."""
        if not resumable or self.config.detach_grace <= 0:
            return stream
        feed = Feed(stream, self.config.detach_grace)
        for entry in entries:
            entry.feed = feed
        return feed.primary()

    def _register(
        self,
        inst: Instance,
        ids: list[str],
        gens: list[Any],
        *,
        first_choice: int = 0,
        held: tuple[list[int], float] | None = None,
    ) -> list[Entry]:
        """Register `gens` under `ids` as choices first_choice, first_choice + 1, ...;
        on a clash none stays registered and all are closed. `held`: (prompt, timeout) of
        a migration target."""
        entries: list[Entry] = []
        try:
            for i, (gen_id, gen) in enumerate(zip(ids, gens, strict=True)):
                entries.append(
                    self.generations.register(
                        gen_id, inst.id, inst.spec.function, gen, first_choice + i, held=held
                    )
                )
        except BaseException:
            for entry in entries:
                self.generations.end(entry, "cancelled", None)
            for gen in gens:
                gen.close()
            raise
        return entries

    def _spec(self, doc: Any) -> FunctionSpec:
        return FunctionSpec.from_json(doc, default_concurrency=self.config.default_concurrency)

    def embed(self, body: Any) -> dict[str, Any]:
        """Embeddings of `input`: a string, a list of them, token ids, or a list of those."""
        doc = require_object(body)
        spec = self._spec({**doc, "task": doc.get("task", "embed")})
        if spec.task != "embed":
            raise InvalidRequest(f"function {spec.function!r} is a {spec.task} function")
        inputs = embedding_inputs(doc.get("input"), MAX_EMBED_INPUTS)  # before any load
        for attempt in range(2):
            inst, report = self.instances.ensure(spec)
            try:
                vectors, used = inst.runtime.embed(inputs)
                break
            except Unavailable:  # unloaded between ensure and embed: load it again
                if attempt:
                    raise
        self.metrics.observe_load(report)
        inst.last_used = time.time()
        return {
            "data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": used, "total_tokens": used},
            "load": report.to_json(),
        }

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """Tier contents with sizes, instances, free device memory, load queue, bandwidths."""
        device: dict[str, Any] = {"name": str(self.device)}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            device.update(free_bytes=free, total_bytes=total)
        return {
            "ready": self.ready(),
            "uptime_s": time.time() - self.started_at,
            "device": device,
            "tiers": {
                "nvme": {
                    "capacity_bytes": self.nvme.capacity,
                    "used_bytes": self.nvme.used_bytes,
                    "models": self.nvme.contents(),
                },
                "dram": {
                    "capacity_bytes": self.pool.capacity,
                    "used_bytes": self.pool.used_bytes,
                    "models": self.tiers.dram_contents(),
                },
            },
            "instances": self.instances.to_json(),
            "generations": [e.summary() for e in self.generations.running()],
            "draining": self.drain.report(),
            "load_queue": self.instances.queue_length(),
            "bandwidths": self.bandwidths.to_json(),
        }


def _touching(
    inst: Instance, stream: Generator[dict[str, Any], None, None]
) -> Generator[dict[str, Any], None, None]:
    """`stream`, marking `inst` used when it ends (also when the client goes away)."""
    try:
        yield from stream
    finally:
        stream.close()
        inst.last_used = time.time()


def _field_n(doc: Mapping[str, Any]) -> int:
    value = doc.get("n")
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_N:
        raise InvalidRequest(f"'n' must be an integer in [1, {MAX_N}], got {value!r}", param="n")
    return value


def _field_choice(doc: Mapping[str, Any]) -> int:
    """A resumed generation's choice index in its request (its events carry it); default 0."""
    value = doc.get("choice", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_N:
        raise InvalidRequest(
            f"'choice' must be an integer in [0, {MAX_N - 1}], got {value!r}", param="choice"
        )
    return value


def _field_hold(doc: Mapping[str, Any]) -> bool:
    """The resume's "hold" flag (a migration target, see _holds): a boolean, false when absent."""
    value = doc.get("hold", False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"'hold' must be true or false, got {show_value(value)}", param="hold")
    return value


def _field_resumable(doc: Mapping[str, Any]) -> bool:
    """The request's "resumable" flag (see _stream): a boolean, false when absent."""
    value = doc.get("resumable", False)
    if not isinstance(value, bool):
        raise InvalidRequest(
            f"'resumable' must be true or false, got {show_value(value)}", param="resumable"
        )
    return value


def _start(
    inst: Instance,
    tokens: list[int],
    params: SamplingParams,
    n: int,
    prompt_param: str,
    gen_id: str,
) -> list[Any]:
    """n generations of `tokens` sharing one prefill, named as the registry names them."""
    return list(
        inst.runtime.start_many(tokens, params, n, prompt_param=prompt_param, gen_id=gen_id)
    )


def _check_prompt(doc: Mapping[str, Any]) -> str:
    """Checks of the prompt fields that need no model (so a bad request costs no load).

    Returns the field the prompt came in: "prompt", "messages" or "tokens".
    """
    given = [k for k in ("prompt", "messages", "tokens") if doc.get(k) is not None]
    if len(given) != 1:
        raise InvalidRequest("give exactly one of 'prompt', 'messages' or 'tokens'")
    if "prompt" in given and (not isinstance(doc["prompt"], str) or not doc["prompt"]):
        raise InvalidRequest("'prompt' must be a non-empty string", param="prompt")
    if "messages" in given and (not isinstance(doc["messages"], list) or not doc["messages"]):
        raise InvalidRequest(
            "'messages' must be a non-empty list of {role, content} objects", param="messages"
        )
    tokens = doc.get("tokens")
    if "tokens" in given and (
        not isinstance(tokens, list)
        or not tokens
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)
    ):
        raise InvalidRequest(
            "'tokens' must be a non-empty list of non-negative token ids", param="tokens"
        )
    return given[0]


def _prompt_tokens(inst: Instance, doc: Mapping[str, Any]) -> list[int]:
    if doc.get("tokens") is not None:
        vocab = len(inst.runtime.tokenizer)
        if any(t >= vocab for t in doc["tokens"]):
            raise InvalidRequest(f"'tokens' must be token ids in [0, {vocab})", param="tokens")
        return list(doc["tokens"])
    if doc.get("prompt") is not None:
        return inst.runtime.encode(prompt=doc["prompt"])
    return inst.runtime.encode(messages=doc["messages"])

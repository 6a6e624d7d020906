"""Invoker processes on loopback against a real S3-compatible server: tiers, streaming, errors."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from sllm.native_loader import save_state_dict
from sllm.store import StoreSettings, open_store, push_model
from sllm.tiny_models import build_tiny_embedder, build_tiny_model
from tests.support.invoker import InvokerProcess
from tests.support.s3 import S3Server

pytestmark = [pytest.mark.s3, pytest.mark.invoker]


def s3_env(settings: StoreSettings) -> dict[str, str]:
    return {
        "SLLM_S3_ENDPOINT": settings.endpoint or "",
        "SLLM_S3_ACCESS_KEY": settings.access_key or "",
        "SLLM_S3_SECRET_KEY": settings.secret_key or "",
        "SLLM_S3_SECURE": "false",
    }


@pytest.fixture(scope="module")
def cluster(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A bucket with published models and two invokers with their own caches and budgets."""
    root = tmp_path_factory.mktemp("cluster")
    uri = f"s3://invoker-{uuid.uuid4().hex[:10]}/sllm"
    settings = s3_server.settings()
    store = open_store(uri, settings)
    models = {}
    for name, seed in (("llama-a", 0), ("llama-b", 1), ("llama-c", 2)):
        src = build_tiny_model("llama", root / f"hf-{name}", seed=seed)
        models[name] = push_model(str(src), name, store, progress=False).model
    emb = build_tiny_embedder(root / "hf-emb", seed=3)
    models["emb"] = push_model(str(emb), "emb", store, progress=False).model
    # A checkpoint bigger than the small invoker's whole DRAM budget.
    huge = {"w": torch.zeros(1 << 20, dtype=torch.float32)}
    save_state_dict(huge, root / "huge", files={"config.json": root / "hf-llama-a" / "config.json"})
    push_model(str(root / "huge"), "huge", store, progress=False)
    size = max(m.total_bytes for m in models.values())  # "huge" is not in `models`
    env = s3_env(settings)
    big = InvokerProcess(root / "big", uri, env=env)
    # Room for one llama in DRAM (the pool rounds each partition up to 2 MiB).
    small = InvokerProcess(root / "small", uri, env=env, dram="3MiB", nvme=str(size * 2 + 100_000))
    procs = [big, small]
    try:
        for p in procs:
            p.start()
        yield {"big": big, "small": small, "models": models, "store": store}
    finally:
        for p in procs:
            p.stop()


def invoke(proc: InvokerProcess, function: str, model: str, **extra: Any) -> httpx.Response:
    body = {"function": function, "model": model, "prompt": "hello there", "temperature": 0}
    return proc.post("/v1/invoke", {**body, **extra})


def fn() -> str:
    return f"test/{uuid.uuid4().hex[:8]}"


def test_every_endpoint_needs_the_token(cluster: dict[str, Any]) -> None:
    big: InvokerProcess = cluster["big"]
    for path in ("/healthz", "/v1/status", "/metrics"):
        r = httpx.get(big.url + path, timeout=10)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        r = httpx.get(big.url + path, headers=big.headers("wrong"), timeout=10)
        assert r.status_code == 401
    r = httpx.post(big.url + "/v1/invoke", json={"model": "llama-a"}, timeout=10)
    assert r.status_code == 401


def test_tiers_remote_warm_dram_nvme(cluster: dict[str, Any]) -> None:
    big: InvokerProcess = cluster["big"]
    f = fn()
    first = invoke(big, f, "llama-a", max_tokens=6)
    assert first.status_code == 200, first.text
    doc = first.json()
    assert doc["load"]["tier"] == "remote" and doc["load"]["cold"] is True
    assert doc["usage"]["completion_tokens"] == len(doc["tokens"]) == 6
    warm = invoke(big, f, "llama-a", max_tokens=6).json()
    assert warm["load"]["tier"] == "gpu" and warm["load"]["cold"] is False
    assert warm["tokens"] == doc["tokens"]  # greedy: same tokens whatever the tier
    assert big.post("/v1/unload", {"function": f}).json()["unloaded"] is True
    from_dram = invoke(big, f, "llama-a", max_tokens=6).json()
    assert from_dram["load"]["tier"] == "dram" and from_dram["tokens"] == doc["tokens"]
    big.post("/v1/unload", {"function": f})
    r = big.post("/v1/evict", {"model": "llama-a", "tier": "dram"})
    assert r.status_code == 200, r.text
    from_nvme = invoke(big, f, "llama-a", max_tokens=6).json()
    assert from_nvme["load"]["tier"] == "nvme" and from_nvme["tokens"] == doc["tokens"]
    status = big.client().get("/v1/status").json()
    assert any(i["function"] == f and i["loaded_from"] == "nvme" for i in status["instances"])
    nvme_keys = [m["key"] for m in status["tiers"]["nvme"]["models"]]
    assert any(k.startswith("llama-a@") for k in nvme_keys)
    assert status["bandwidths"]["disk"] > 0
    metrics = big.client().get("/metrics").text
    for tier in ("remote", "dram", "nvme", "gpu"):
        assert f'sllm_invoker_loads_total{{tier="{tier}"}}' in metrics


def test_streaming_matches_blocking(cluster: dict[str, Any]) -> None:
    big: InvokerProcess = cluster["big"]
    f = fn()
    blocking = invoke(big, f, "llama-b", max_tokens=8).json()
    events = []
    with big.client().stream(
        "POST",
        "/v1/invoke",
        json={
            "function": f,
            "model": "llama-b",
            "prompt": "hello there",
            "temperature": 0,
            "max_tokens": 8,
            "stream": True,
        },
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            events.append(json.loads(line))
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    tokens = [e["token"] for e in events if e["event"] == "token" and e["token"] is not None]
    assert tokens == blocking["tokens"]
    assert "".join(e["text"] for e in events if e["event"] == "token") == blocking["text"]
    assert events[-1]["usage"]["completion_tokens"] == 8
    assert events[-1]["timing"]["ttft_s"] > 0


def test_embeddings(cluster: dict[str, Any]) -> None:
    big: InvokerProcess = cluster["big"]
    r = big.post("/v1/embed", {"function": fn(), "model": "emb", "input": ["a cat", "a dog"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert len(data[0]["embedding"]) == len(data[1]["embedding"]) > 0
    assert data[0]["embedding"] != data[1]["embedding"]
    norm = sum(x * x for x in data[0]["embedding"]) ** 0.5
    assert abs(norm - 1.0) < 1e-4  # the embedder's folder asks for normalisation
    single = big.post("/v1/embed", {"function": fn(), "model": "emb", "input": "a cat"}).json()
    assert single["data"][0]["embedding"] == pytest.approx(data[0]["embedding"], abs=1e-5)


def test_without_max_tokens_a_generation_fills_the_context_under_the_limit(
    cluster: dict[str, Any],
) -> None:
    """Greedy on [5] * n never meets eos within the context, so every run ends on length."""
    big: InvokerProcess = cluster["big"]
    f = fn()
    capped = invoke(big, f, "llama-a", prompt=None, tokens=[5] * 100, max_tokens_limit=3).json()
    assert (capped["usage"]["completion_tokens"], capped["finish_reason"]) == (3, "length")
    filled = invoke(big, f, "llama-a", prompt=None, tokens=[5] * 120).json()
    assert filled["usage"] == {"prompt_tokens": 120, "completion_tokens": 8, "total_tokens": 128}
    assert filled["finish_reason"] == "length"


def test_embeddings_of_token_ids(cluster: dict[str, Any]) -> None:
    big: InvokerProcess = cluster["big"]
    r = big.post("/v1/embed", {"function": fn(), "model": "emb", "input": [[1, 2, 3], [4]]})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2 and r.json()["usage"]["prompt_tokens"] == 4
    one = big.post("/v1/embed", {"function": fn(), "model": "emb", "input": [1, 2, 3]}).json()
    assert one["data"][0]["embedding"] == pytest.approx(r.json()["data"][0]["embedding"], abs=1e-5)


def test_single_flight_across_concurrent_requests(cluster: dict[str, Any]) -> None:
    small: InvokerProcess = cluster["small"]
    f = fn()
    before = _loads(small, "remote")
    results: list[httpx.Response] = []

    def go() -> None:
        results.append(invoke(small, f, "llama-c", max_tokens=3))

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in results] == [200] * 4
    tiers = sorted(r.json()["load"]["tier"] for r in results)
    assert tiers.count("remote") == 1 and tiers.count("gpu") == 3
    assert _loads(small, "remote") == before + 1
    assert len({tuple(r.json()["tokens"]) for r in results}) == 1
    small.post("/v1/unload", {"function": f})


def test_dram_pressure_displaces_idle_instances(cluster: dict[str, Any]) -> None:
    small: InvokerProcess = cluster["small"]
    fa, fb = fn(), fn()
    assert invoke(small, fa, "llama-a", max_tokens=2).status_code == 200
    # DRAM holds one model; llama-a's idle instance (its weights are that DRAM
    # copy on the CPU) is unloaded to make room for llama-b.
    r = invoke(small, fb, "llama-b", max_tokens=2)
    assert r.status_code == 200, r.text
    status = small.client().get("/v1/status").json()
    assert [i["function"] for i in status["instances"]] == [fb]
    assert [m["key"].split("@")[0] for m in status["tiers"]["dram"]["models"]] == ["llama-b"]
    small.post("/v1/unload", {"function": fb})
    again = invoke(small, fa, "llama-a", max_tokens=2).json()
    assert again["load"]["tier"] == "nvme"  # still on the NVMe tier
    small.post("/v1/unload", {"function": fa})


def test_model_larger_than_the_budgets_is_a_clear_error(cluster: dict[str, Any]) -> None:
    small: InvokerProcess = cluster["small"]
    r = small.post("/v1/load", {"function": fn(), "model": "huge"})
    assert r.status_code == 507, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_capacity" and "DRAM" in err["message"]
    assert small.client().get("/healthz").status_code == 200


def test_two_invokers_have_separate_caches(cluster: dict[str, Any]) -> None:
    big, small = cluster["big"], cluster["small"]
    assert invoke(big, fn(), "llama-c", max_tokens=2).status_code == 200
    big_nvme = big.client().get("/v1/status").json()["tiers"]["nvme"]["models"]
    small_nvme = small.client().get("/v1/status").json()["tiers"]["nvme"]["models"]
    assert any(m["key"].startswith("llama-c@") for m in big_nvme)
    assert Path(big.cache_dir) != Path(small.cache_dir)
    assert {m["key"] for m in small_nvme} != {m["key"] for m in big_nvme} or small_nvme == []


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ({"model": "llama-a", "prompt": "x"}, 400, "invalid_request", "'function'"),
        (
            {"function": "t/f", "model": "no-such-model", "prompt": "x"},
            404,
            "not_found",
            "no-such-model",
        ),
        ({"function": "t/f", "model": "../etc", "prompt": "x"}, 400, "invalid_request", "'model'"),
        ({"function": "t/f", "model": "llama-a"}, 400, "invalid_request", "exactly one of"),
        (
            {"function": "t/f", "model": "llama-a", "prompt": "x", "max_tokens": 10**9},
            400,
            "invalid_request",
            "max_tokens",
        ),
        (
            {"function": "t/f", "model": "llama-a", "prompt": "x", "temperature": -1},
            400,
            "invalid_request",
            "temperature",
        ),
        (
            {"function": "t/f", "model": "llama-a", "prompt": "x", "top_p": 0},
            400,
            "invalid_request",
            "top_p",
        ),
        (
            {"function": "t/f", "model": "llama-a", "prompt": "x", "stream": "yes"},
            400,
            "invalid_request",
            "stream",
        ),
        (
            {"function": "t/f", "model": "llama-a", "tokens": [1, -5]},
            400,
            "invalid_request",
            "tokens",
        ),
        (
            {"function": "t/f", "model": "emb", "task": "embed", "prompt": "x"},
            400,
            "invalid_request",
            "embed function",
        ),
        ([1, 2, 3], 400, "invalid_request", "JSON object"),
        (
            {"function": "t/f", "model": "llama-a", "tokens": [5] * 100, "max_tokens": 29},
            400,
            "context_length_exceeded",
            "maximum context length is 128 tokens",
        ),
        (
            {"function": "t/f", "model": "llama-a", "prompt": "x", "max_tokens_limit": 0},
            400,
            "invalid_request",
            "max_tokens_limit",
        ),
        (
            {"function": "t/f", "model": "emb", "task": "embed", "input": [[1] * 129]},
            400,
            "context_length_exceeded",
            "maximum context length is 128 tokens",
        ),
    ],
    ids=[
        "no-function",
        "unknown-model",
        "path-model",
        "no-prompt",
        "absurd-max-tokens",
        "negative-temperature",
        "zero-top-p",
        "stream-type",
        "bad-token-ids",
        "wrong-task",
        "not-an-object",
        "context-overflow",
        "bad-max-tokens-limit",
        "embed-input-too-long",
    ],
)
def test_bad_requests_are_clear_4xx(
    cluster: dict[str, Any], body: Any, status: int, code: str, words: str
) -> None:
    embeds = isinstance(body, dict) and "input" in body
    r = cluster["big"].post("/v1/embed" if embeds else "/v1/invoke", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and words in err["message"]


def test_malformed_and_oversized_bodies(cluster: dict[str, Any]) -> None:
    big: InvokerProcess = cluster["big"]
    c = big.client()
    r = c.post("/v1/invoke", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = c.post(
        "/v1/invoke", json={"function": "t/f", "model": "llama-a", "prompt": "x" * (5 << 20)}
    )
    assert r.status_code == 413
    r = c.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = c.post("/v1/unload", json={"function": "never/loaded"})
    assert r.status_code == 404
    r = c.post("/v1/evict", json={"model": "llama-a", "tier": "gpu"})
    assert r.status_code == 400 and "tier" in r.json()["error"]["message"]
    # The process survived all of it.
    assert c.get("/healthz").status_code == 200


def _loads(proc: InvokerProcess, tier: str) -> float:
    for line in proc.client().get("/metrics").text.splitlines():
        if line.startswith(f'sllm_invoker_loads_total{{tier="{tier}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_corrupt_nvme_copy_heals_through_the_store(cluster: dict[str, Any], tmp_path: Path) -> None:
    big: InvokerProcess = cluster["big"]
    src = build_tiny_model("llama", tmp_path / "hf-d", seed=4)
    model = push_model(str(src), "llama-d", cluster["store"], progress=False).model
    f = fn()
    truth = invoke(big, f, "llama-d", max_tokens=5).json()["tokens"]
    big.post("/v1/unload", {"function": f})
    assert big.post("/v1/evict", {"model": "llama-d", "tier": "dram"}).status_code == 200
    data0 = big.cache_dir / "nvme" / f"{model.name}@{model.digest}" / "data.0"
    blob = bytearray(data0.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data0.write_bytes(bytes(blob))
    healed = invoke(big, f, "llama-d", max_tokens=5).json()
    assert healed["load"]["tier"] == "remote"  # the bad copy was dropped, not served
    assert healed["tokens"] == truth
    big.post("/v1/unload", {"function": f})


def test_a_new_invoker_process_resumes_an_interrupted_download(
    cluster: dict[str, Any], s3_server: S3Server, tmp_path: Path
) -> None:
    from sllm.core.errors import StoreError
    from sllm.invoker import Bandwidths, NvmeTier, TierCache
    from sllm.native_loader import HostPool

    store = cluster["store"]
    src = build_tiny_model("llama", tmp_path / "hf-r", seed=9)
    # Small chunks, so the download has many parts to interrupt.
    model = push_model(str(src), "llama-r", store, progress=False, chunk_size=16 * 1024).model

    class Flaky:
        """The bucket, with the connection 'dropping' after two ranged GETs."""

        def __init__(self) -> None:
            self.uri, self.calls = store.uri, 0

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def get_range_into(self, key: str, offset: int, view: memoryview) -> None:
            self.calls += 1
            if self.calls > 2:
                raise StoreError("connection reset (simulated)")
            store.get_range_into(key, offset, view)

    cache_dir = tmp_path / "resume-cache"
    # A first attempt dies part-way, leaving a partial download in the cache folder.
    tiers = TierCache(
        Flaky(),
        NvmeTier(cache_dir, 1 << 30),
        HostPool(1 << 30, pin=False),
        Bandwidths(),
        download_concurrency=1,
        part_size=16 * 1024,
    )
    with pytest.raises(StoreError):
        tiers.load(model, torch.device("cpu"))
    assert any((cache_dir / "partial").iterdir())
    proc = InvokerProcess(cache_dir, store.uri, env=s3_env(s3_server.settings()))
    proc.args[proc.args.index("--nvme-capacity") + 1] = "1GiB"
    proc.start()
    try:
        r = proc.post("/v1/load", {"function": "t/resume", "model": "llama-r"})
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["tier"] == "remote"
        assert report["resumed_bytes"] > 0
        assert report["fetched_bytes"] + report["resumed_bytes"] == sum(
            f.size for f in model.files if f.path.startswith("data.")
        )
        assert not any((cache_dir / "partial").iterdir())
    finally:
        proc.stop()

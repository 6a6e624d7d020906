"""The invoker on a GPU: every tier streams to the device and generates the CPU's tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sllm.invoker import Bandwidths, Invoker, InvokerConfig, NvmeTier, TierCache
from sllm.native_loader import HostPool
from sllm.store import open_store, push_model
from sllm.tiny_models import build_tiny_model

pytestmark = pytest.mark.gpu

CHUNK = 64 * 1024


def _tokens(invoker: Invoker, function: str) -> tuple[str, list[int]]:
    request = {
        "function": function,
        "model": "tiny",
        "prompt": "hello there",
        "max_tokens": 8,
        "temperature": 0,
    }
    report, events = invoker.invoke(request)
    out: list[Any] = [e["token"] for e in events if e["event"] == "token"]
    return report.tier, out


def test_tiers_stream_to_the_gpu(tmp_path: Path) -> None:
    src = build_tiny_model("llama", tmp_path / "hf")
    uri = (tmp_path / "store").as_uri()
    model = push_model(str(src), "tiny", open_store(uri), progress=False, chunk_size=CHUNK).model
    cache = TierCache(
        open_store(uri),
        NvmeTier(tmp_path / "cache", 1 << 30),
        HostPool(1 << 30, pin=True),
        Bandwidths(),
        part_size=2 * CHUNK,
    )
    cpu, _ = cache.load(model, torch.device("cpu"))
    truth = {k: v.clone() for k, v in cpu.items()}
    del cpu
    for expected in ("dram", "nvme"):
        if expected == "nvme":
            assert cache.evict_dram(model)
        gpu, how = cache.load(model, torch.device("cuda", 0))
        assert how.tier == expected
        assert all(gpu[k].is_cuda and torch.equal(gpu[k].cpu(), truth[k]) for k in truth)
        del gpu


def test_invoker_on_cuda_matches_cpu(tmp_path: Path) -> None:
    src = build_tiny_model("llama", tmp_path / "hf")
    uri = (tmp_path / "store").as_uri()
    push_model(str(src), "tiny", open_store(uri), progress=False)
    results = {}
    for device in ("cpu", "cuda:0"):
        config = InvokerConfig(
            token="t",
            cache_dir=tmp_path / f"cache-{device}",
            store_uri=uri,
            device=device,
            measure_bandwidth=device != "cpu",
        )
        invoker = Invoker(config)
        invoker.start()
        first = _tokens(invoker, "t/f")
        assert first[0] == "remote"
        warm = _tokens(invoker, "t/f")
        assert warm == ("gpu", first[1])
        invoker.instances.unload("t/f")
        assert _tokens(invoker, "t/f") == ("dram", first[1])
        if device != "cpu":
            assert invoker.bandwidths.get("host_to_device")
            assert invoker.status()["device"]["free_bytes"] > 0
        results[device] = first[1]
        invoker.close()
    assert results["cpu"] == results["cuda:0"]

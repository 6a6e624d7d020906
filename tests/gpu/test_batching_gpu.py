"""Continuous batching on a GPU: the slot cache lives on the device, and a batch gives each
sequence the tokens it gets alone and on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm.native_loader import convert, load_model
from sllm.runtime import Runtime, SamplingParams, load_tokenizer, model_class_for
from sllm.tiny_models import build_tiny_model

pytestmark = pytest.mark.gpu

PROMPTS = ("Hello world! The quick brown fox", "Tests", "A checkpoint is a set of tensors")


def _runtime(folder: Path, device: str, **kw: object) -> Runtime:
    model = load_model(folder, cls=model_class_for(folder, "generate"), device=device)
    return Runtime(model, load_tokenizer(folder), folder, concurrency=8, **kw)  # type: ignore[arg-type]


def _drain(generation: object) -> list[int]:
    out = []
    with generation:  # type: ignore[attr-defined]
        while not generation.finished:  # type: ignore[attr-defined]
            event = generation.step(timeout=60)  # type: ignore[attr-defined]
            if event.token is not None:
                out.append(event.token)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_generation_on_the_gpu_matches_alone_and_the_cpu(tmp_path: Path, arch: str) -> None:
    folder = tmp_path / arch
    convert(build_tiny_model(arch, tmp_path / "src", init_std=0.5), folder)
    gpu = _runtime(folder, "cuda:0", kv_cache_bytes=64 << 20)
    cpu = _runtime(folder, "cpu", batching=False)
    assert gpu.batching and gpu.device.type == "cuda"
    params = SamplingParams(max_tokens=16, temperature=0.0)
    prompts = [gpu.encode(prompt=p) for p in PROMPTS]

    together = [_drain(g) for g in [gpu.start(p, params) for p in prompts]]

    assert together == [_drain(gpu.start(p, params)) for p in prompts]
    assert together == [_drain(cpu.start(p, params)) for p in prompts]

"""CUDA loading: pipelined NVMe->GPU and DRAM->GPU copies are bit-identical to the CPU load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sllm.native_loader import HostPool, convert, load, load_model, load_with_info, save_state_dict
from sllm.tiny_models import build_tiny_model, reference_logits

pytestmark = pytest.mark.gpu


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {
        f"layers.{i}.weight": torch.randn(512, 1024, generator=g).to(torch.bfloat16)
        for i in range(6)
    }
    sd["norm"] = torch.randn(1024, generator=g)
    sd["scalar"] = torch.tensor(3, dtype=torch.int64)
    sd["empty"] = torch.empty(0, 4, dtype=torch.float16)
    sd["flags"] = torch.rand(33, generator=g) > 0.5
    return sd


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    save_state_dict(_state_dict(), tmp_path / "ckpt", chunk_size=64 * 1024)
    return tmp_path / "ckpt"


def _equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8)
        )
    )


def test_cuda_load_is_bit_identical(checkpoint: Path) -> None:
    cpu = load(checkpoint)
    gpu = load(checkpoint, "cuda:0")
    assert set(gpu) == set(cpu)
    for name, t in gpu.items():
        assert t.device.type == "cuda", name
        assert _equal_bits(t, cpu[name]), name


def test_pool_nvme_then_dram_to_gpu(checkpoint: Path) -> None:
    pool = HostPool(256 * 1024 * 1024)
    assert pool.pin, "with CUDA the pool pins its buffers"
    first = load_with_info(checkpoint, "cuda:0", pool=pool)
    second = load_with_info(checkpoint, "cuda:0", pool=pool)
    assert not first.hit and second.hit
    cpu = load(checkpoint)
    for name in cpu:
        assert _equal_bits(first.tensors[name], cpu[name]), name
        assert _equal_bits(second.tensors[name], cpu[name]), name


def test_partitions_on_separate_pipelines(tmp_path: Path) -> None:
    sd = _state_dict()
    save_state_dict(sd, tmp_path / "two", device_map=2)
    target = {0: "cuda:0", 1: "cuda:0" if torch.cuda.device_count() == 1 else "cuda:1"}
    out = load(tmp_path / "two", target)
    for name, t in sd.items():
        assert _equal_bits(out[name], t), name


def test_load_model_on_cuda_matches_reference(tmp_path: Path) -> None:
    src = build_tiny_model("llama", tmp_path / "hf")
    convert(src, tmp_path / "ckpt")
    model = load_model(tmp_path / "ckpt", "cuda:0")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits = model(input_ids=ids.cuda()).logits.cpu()
    torch.testing.assert_close(logits, reference_logits(src, ids), rtol=1e-4, atol=1e-4)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(b.device.type == "cuda" for b in model.buffers())

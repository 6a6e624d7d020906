"""CUDA loading: pipelined NVMe->GPU and DRAM->GPU copies are bit-identical to the CPU load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sllm.native_loader import (
    HostPool,
    convert,
    load,
    load_model,
    load_with_info,
    read_manifest,
    save_state_dict,
)
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


# About a second on any current GPU: far longer than reading and copying 8 MiB takes.
_QUEUED_CYCLES = 2_000_000_000


@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "dram-hit"])
def test_device_copies_wait_for_work_queued_on_reused_memory(tmp_path: Path, pooled: bool) -> None:
    """A device buffer reused from the caching allocator is filled only after its last user.

    A previous owner's kernel still queued on the current stream writes to the block the
    load gets next; copies on a side stream that did not wait for it would be overwritten.
    """
    weight = torch.arange(2 * 1024 * 1024, dtype=torch.int32)  # 8 MiB, one partition
    save_state_dict({"w": weight}, tmp_path / "ckpt")
    nbytes = read_manifest(tmp_path / "ckpt").partitions[0].nbytes  # the device buffer's size
    pool = HostPool(64 * 1024 * 1024) if pooled else None
    if pool is not None:
        load(tmp_path / "ckpt", pool=pool)  # the host copy is resident: the load is a DRAM hit
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    previous = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    block = previous.data_ptr()
    torch.cuda._sleep(_QUEUED_CYCLES)
    previous.fill_(0xFF)  # still queued behind the sleep when the load starts
    del previous  # the block goes back to the allocator, reusable on this stream at once
    out = load(tmp_path / "ckpt", "cuda:0", pool=pool)
    assert out["w"].untyped_storage().data_ptr() == block, (
        "the load must get the freed block for this test"
    )
    torch.cuda.synchronize()
    assert torch.equal(out["w"].cpu(), weight)

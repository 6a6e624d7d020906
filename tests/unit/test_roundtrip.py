"""Bit-identical round trips through the checkpoint format: every dtype, odd shapes, tied
tensors, alignment, chunking and metadata."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sllm.native_loader import (
    ConversionError,
    convert,
    load,
    load_with_info,
    read_manifest,
    save_state_dict,
)
from sllm.native_loader._dtypes import SUPPORTED, to_torch
from sllm.native_loader._format import LARGE_TENSOR, PAGE, SMALL_ALIGN

SHAPES: dict[str, Callable[[int], tuple[int, ...]]] = {
    "scalar": lambda item: (),
    "empty": lambda item: (0,),
    "empty-3d": lambda item: (3, 0, 5),
    "7x13": lambda item: (7, 13),
    "over-64KiB": lambda item: (LARGE_TENSOR // item + 3,),
}


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor whose bytes are random: NaN payloads, subnormals, any bool byte."""
    gen = torch.Generator().manual_seed(seed)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(raw_bytes(got), raw_bytes(want))


def write_safetensors(tensors: dict[str, torch.Tensor], dst: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))
    convert(src, dst)


def write_state_dict(tensors: dict[str, torch.Tensor], dst: Path, tmp_path: Path) -> None:
    save_state_dict(tensors, dst)


WRITERS = {"safetensors": write_safetensors, "state_dict": write_state_dict}


def crc32c(data: bytes) -> int:
    """Reference CRC32C (Castagnoli, reflected 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
@pytest.mark.parametrize("dtype_name", SUPPORTED, ids=SUPPORTED)
def test_every_dtype_and_shape_round_trips_bit_identical(
    tmp_path: Path,
    dtype_name: str,
    writer: Callable[[dict[str, torch.Tensor], Path, Path], None],
) -> None:
    dtype = to_torch(dtype_name)
    # One checkpoint holds every odd shape (one fsync'd conversion per case keeps this fast);
    # the small neighbour "a.first" makes sure no tensor under test sits at offset 0.
    tensors = {"a.first": random_tensor(torch.uint8, (3,), seed=99)}
    for seed, (shape_id, shape_of) in enumerate(SHAPES.items()):
        tensors[f"b.{shape_id}"] = random_tensor(dtype, shape_of(dtype.itemsize), seed=seed)
    dst = tmp_path / "ckpt"

    writer(tensors, dst, tmp_path)
    loaded = load(dst)

    assert set(loaded) == set(tensors)
    for name, want in tensors.items():
        got = loaded[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert torch.equal(raw_bytes(got), raw_bytes(want)), f"{name}: bytes differ"


def test_non_contiguous_state_dict_tensor_loads_with_its_logical_values(tmp_path: Path) -> None:
    base = random_tensor(torch.float32, (7, 13))
    transposed = base.t()
    assert not transposed.is_contiguous()

    save_state_dict({"t": transposed, "slice": base[2:5, 3]}, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")

    assert_same_bits(loaded["t"], transposed.contiguous())
    assert_same_bits(loaded["slice"], base[2:5, 3].contiguous())


def write_tied_state_dict(tensors: dict[str, torch.Tensor], dst: Path, tmp_path: Path) -> None:
    save_state_dict(tensors, dst)


def write_tied_torch_file(tensors: dict[str, torch.Tensor], dst: Path, tmp_path: Path) -> None:
    src = tmp_path / "pytorch_model.bin"
    torch.save(tensors, src)
    convert(src, dst)


TIED_WRITERS = {"state_dict": write_tied_state_dict, "torch-bin": write_tied_torch_file}


@pytest.mark.parametrize("writer", TIED_WRITERS.values(), ids=TIED_WRITERS.keys())
def test_tied_tensors_are_stored_once_and_load_sharing_memory(
    tmp_path: Path, writer: Callable[[dict[str, torch.Tensor], Path, Path], None]
) -> None:
    weight = random_tensor(torch.float32, (300, 64))  # 76.8 KB: one page-aligned copy
    # "z..." sorts after "lm_head", so the alias is listed before the tensor it aliases.
    tensors = {"z.embed.weight": weight, "lm_head.weight": weight, "bias": torch.ones(4)}
    dst = tmp_path / "ckpt"

    writer(tensors, dst, tmp_path)

    manifest = read_manifest(dst)
    embed, head = manifest.tensors["z.embed.weight"], manifest.tensors["lm_head.weight"]
    assert (embed.partition, embed.offset) == (head.partition, head.offset)
    partition_bytes = (dst / "data.0").stat().st_size
    assert partition_bytes == manifest.partitions[0].nbytes
    assert partition_bytes < 2 * weight.nbytes, "the tied weight was written twice"

    loaded = load(dst)
    assert loaded["z.embed.weight"].data_ptr() == loaded["lm_head.weight"].data_ptr()
    assert_same_bits(loaded["lm_head.weight"], weight)
    assert_same_bits(loaded["bias"], torch.ones(4))


def test_equal_but_separate_tensors_are_both_stored(tmp_path: Path) -> None:
    weight = random_tensor(torch.float32, (300, 64))
    rows = random_tensor(torch.float32, (2, 128))

    # Same values, different storage; and two views of one storage at different offsets.
    save_state_dict(
        {"a": weight, "b": weight.clone(), "r0": rows[0], "r1": rows[1]}, tmp_path / "ckpt"
    )

    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest.tensors["a"].offset != manifest.tensors["b"].offset
    assert manifest.tensors["r0"].offset != manifest.tensors["r1"].offset
    loaded = load(tmp_path / "ckpt")
    assert_same_bits(loaded["b"], weight)
    assert_same_bits(loaded["r0"], rows[0])
    assert_same_bits(loaded["r1"], rows[1])


ALIGNMENT_SIZES = [1, 3, 100, LARGE_TENSOR - 1, 5, LARGE_TENSOR, 70_000, 7, 200_003, 64, 0]


@pytest.mark.parametrize("device_map", [None, 2], ids=["one-partition", "two-partitions"])
def test_layout_alignment(tmp_path: Path, device_map: int | None) -> None:
    tensors = {
        f"layers.{i}.w": random_tensor(torch.uint8, (size,), seed=i)
        for i, size in enumerate(ALIGNMENT_SIZES)
    }
    dst = tmp_path / "ckpt"

    manifest = save_state_dict(tensors, dst, device_map=device_map)

    assert len(manifest.partitions) == (device_map or 1)
    for part in manifest.partitions:
        assert part.nbytes % PAGE == 0
        assert (dst / part.file).stat().st_size == part.nbytes
    for entry in manifest.tensors.values():
        assert entry.offset % SMALL_ALIGN == 0, entry
        if entry.nbytes >= LARGE_TENSOR:
            assert entry.offset % PAGE == 0, entry
    loaded = load(dst)
    for name, t in tensors.items():
        assert_same_bits(loaded[name], t)
        if t.nbytes >= LARGE_TENSOR:  # zero-copy: the view starts on a page in memory too
            assert loaded[name].data_ptr() % PAGE == 0, name


@pytest.mark.parametrize("chunk_size", [PAGE, 2 * PAGE], ids=["4KiB", "8KiB"])
def test_small_chunks_split_partitions_and_carry_crc32c_checksums(
    tmp_path: Path, chunk_size: int
) -> None:
    tensors = {
        "big": random_tensor(torch.bfloat16, (40_000,)),
        "small": random_tensor(torch.float16, (7, 13), seed=1),
    }
    dst = tmp_path / "ckpt"

    manifest = save_state_dict(tensors, dst, chunk_size=chunk_size)

    assert manifest.chunk_size == chunk_size == read_manifest(dst).chunk_size
    part = manifest.partitions[0]
    assert len(part.checksums) == math.ceil(part.nbytes / chunk_size) >= 2
    data = (dst / part.file).read_bytes()
    for i, crc in enumerate(part.checksums):
        assert crc == crc32c(data[i * chunk_size : (i + 1) * chunk_size]), f"chunk {i}"
    loaded = load(dst)
    for name, t in tensors.items():
        assert_same_bits(loaded[name], t)


def test_reference_crc32c_matches_the_standard_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("chunk_size", [0, 1000, PAGE + 1, -PAGE], ids=str)
def test_chunk_size_must_be_a_positive_multiple_of_a_page(tmp_path: Path, chunk_size: int) -> None:
    with pytest.raises(ConversionError, match="multiple of 4096"):
        save_state_dict({"x": torch.ones(3)}, tmp_path / "ckpt", chunk_size=chunk_size)
    assert not (tmp_path / "ckpt").exists()


def test_safetensors_metadata_is_kept(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    metadata = {"format": "pt", "note": "trained on ünïcode", "empty": ""}
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(src), metadata=metadata)

    convert(src, tmp_path / "ckpt")

    assert read_manifest(tmp_path / "ckpt").metadata == metadata
    assert load_with_info(tmp_path / "ckpt").manifest.metadata == metadata


def test_state_dict_metadata_is_kept(tmp_path: Path) -> None:
    save_state_dict({"w": torch.ones(2)}, tmp_path / "ckpt", metadata={"source": "unit-test"})

    assert read_manifest(tmp_path / "ckpt").metadata == {"source": "unit-test"}


@pytest.mark.parametrize(
    "tensors",
    [{}, {"e": torch.empty(0, 4)}, {"s": torch.tensor(2.5, dtype=torch.float64)}],
    ids=["no-tensors", "only-empty", "only-scalar"],
)
def test_degenerate_state_dicts_round_trip(
    tmp_path: Path, tensors: dict[str, torch.Tensor]
) -> None:
    save_state_dict(tensors, tmp_path / "ckpt")

    loaded = load(tmp_path / "ckpt")

    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert_same_bits(loaded[name], t)

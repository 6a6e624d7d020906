"""Partitioning a checkpoint across devices: device maps at conversion, device choice at load,
and the pure planning functions behind them."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoTokenizer

from sllm import tiny_models
from sllm.native_loader import ConversionError, convert, load, load_model, read_manifest
from sllm.native_loader._format import PAGE
from sllm.native_loader._layout import Placement, assign_devices, plan

LAYER = re.compile(r"^(.*?\.\d+)\.")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    return tiny_models.build_tiny_model("llama", tmp_path / "llama")


def layer_of(name: str) -> str | None:
    m = LAYER.match(name)
    return m.group(1) if m else None


def assert_same_tensors(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


# ------------------------------------------------------------------ conversion with a device map
def test_two_devices_give_two_partitions_split_between_whole_layers(
    tmp_path: Path, llama: Path
) -> None:
    dst = tmp_path / "dst"

    manifest = convert(llama, dst, device_map=2)

    assert [(p.file, p.device) for p in manifest.partitions] == [("data.0", 0), ("data.1", 1)]
    assert (dst / "data.0").is_file() and (dst / "data.1").is_file()
    layers: dict[str, set[int]] = defaultdict(set)
    for name, entry in manifest.tensors.items():
        if (layer := layer_of(name)) is not None:
            layers[layer].add(entry.partition)
    assert set(layers) == {"model.layers.0", "model.layers.1"}
    assert all(len(parts) == 1 for parts in layers.values()), f"a layer was split: {layers}"
    # "About equal": a partition overshoots its half by less than one group (a layer, or a
    # lone tensor such as the embedding), since the split only falls between groups.
    groups: dict[str, int] = defaultdict(int)
    for name, entry in manifest.tensors.items():
        groups[layer_of(name) or name] += entry.nbytes
    sizes = [sum(e.nbytes for e in manifest.tensors.values() if e.partition == p) for p in (0, 1)]
    assert max(sizes) - sum(sizes) / 2 < max(groups.values())


def test_prefix_device_map_places_by_longest_prefix(tmp_path: Path, llama: Path) -> None:
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "": 1}

    manifest = convert(llama, tmp_path / "dst", device_map=device_map)

    assert [p.device for p in manifest.partitions] == [0, 1]
    for name, entry in manifest.tensors.items():
        on_zero = name.startswith(("model.embed_tokens.", "model.layers.0."))
        assert entry.partition == (0 if on_zero else 1), name


def test_device_map_that_leaves_a_tensor_unplaced_is_refused(tmp_path: Path, llama: Path) -> None:
    with pytest.raises(ConversionError, match=r"lm_head\.weight"):
        convert(llama, tmp_path / "dst", device_map={"model": 0})

    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["llama"], "a temporary folder was left behind"


def test_two_partition_checkpoint_gives_identical_logits_on_cpu(
    tmp_path: Path, llama: Path
) -> None:
    convert(llama, tmp_path / "dst", device_map=2)
    ids = AutoTokenizer.from_pretrained(llama)("hello world", return_tensors="pt").input_ids

    model = load_model(tmp_path / "dst", device="cpu")

    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.equal(logits, tiny_models.reference_logits(llama, ids))


# ------------------------------------------------------------------ choosing devices at load time
@pytest.fixture
def two_partitions(tmp_path: Path, llama: Path) -> Path:
    convert(llama, tmp_path / "two", device_map=2)
    return tmp_path / "two"


@pytest.mark.parametrize(
    "device",
    ["cpu", torch.device("cpu"), {0: "cpu", 1: "cpu"}, {1: torch.device("cpu"), 0: "cpu"}],
    ids=["str", "torch-device", "per-partition", "per-partition-unordered"],
)
def test_load_two_partitions_on_cpu(
    tmp_path: Path, llama: Path, two_partitions: Path, device: Any
) -> None:
    convert(llama, tmp_path / "one")
    expected = load(tmp_path / "one")

    tensors = load(two_partitions, device=device)

    assert_same_tensors(tensors, expected)
    assert {t.device.type for t in tensors.values()} == {"cpu"}


@NO_CUDA
def test_auto_falls_back_to_cpu_without_cuda(two_partitions: Path) -> None:
    tensors = load(two_partitions, device="auto")

    assert {t.device.type for t in tensors.values()} == {"cpu"}


def test_per_partition_device_map_must_cover_every_partition(two_partitions: Path) -> None:
    with pytest.raises(ValueError, match=r"partitions \[1\]"):
        load(two_partitions, device={0: "cpu"})


@NO_CUDA
@pytest.mark.parametrize(
    "device", ["cuda", "cuda:0", {0: "cpu", 1: "cuda"}], ids=["cuda", "cuda:0", "mixed-map"]
)
def test_cuda_without_cuda_is_a_clear_value_error(two_partitions: Path, device: Any) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        load(two_partitions, device=device)


@pytest.mark.parametrize("device", ["tpu", "meta", "not a device"])
def test_unsupported_device_is_a_value_error(two_partitions: Path, device: str) -> None:
    with pytest.raises(ValueError, match="device"):
        load(two_partitions, device=device)


def test_load_model_refuses_a_device_map(two_partitions: Path) -> None:
    with pytest.raises(ValueError, match="one device"):
        load_model(two_partitions, device="auto")


def test_partition_files_are_page_multiples_on_disk(two_partitions: Path) -> None:
    manifest = read_manifest(two_partitions)

    for part in manifest.partitions:
        size = (two_partitions / part.file).stat().st_size
        assert size == part.nbytes and size % PAGE == 0 and size > 0


# ------------------------------------------------------------------ assign_devices (pure)
MB = 1_000_000
DOC_EXAMPLE = [("embed", 20 * MB)] + [(f"layers.{i}.w", 10 * MB) for i in range(4)]
TWO_TENSOR_LAYERS = [
    ("layers.0.a", 10), ("layers.0.b", 10),
    ("layers.1.a", 10), ("layers.1.b", 10),
    ("layers.2.a", 10), ("layers.2.b", 10),
    ("layers.3.a", 10), ("layers.3.b", 10),
]  # fmt: skip
LLAMA_NAMES = [
    ("lm_head.weight", 8), ("model.embed_tokens.weight", 8),
    ("model.layers.1.mlp.w", 4), ("model.layers.10.mlp.w", 4), ("model.norm.weight", 1),
]  # fmt: skip

ASSIGN_CASES: dict[str, tuple[list[tuple[str, int]], Any, list[int]]] = {
    "none-is-device-0": (DOC_EXAMPLE, None, [0] * 5),
    "one-device": (DOC_EXAMPLE, 1, [0] * 5),
    "docstring-example": (DOC_EXAMPLE, 2, [0, 0, 1, 1, 1]),
    "layers-never-split": (TWO_TENSOR_LAYERS, 2, [0, 0, 0, 0, 1, 1, 1, 1]),
    "four-devices": (TWO_TENSOR_LAYERS, 4, [0, 0, 1, 1, 2, 2, 3, 3]),
    "more-devices-than-layers": ([("a.0.w", 5), ("a.1.w", 5)], 8, [0, 1]),
    "all-empty": ([("a.0.w", 0), ("a.1.w", 0)], 2, [0, 0]),
    "no-tensors": ([], 2, []),
    "catch-all-prefix": (LLAMA_NAMES, {"": 3}, [3] * 5),
    "longest-prefix-wins": (
        LLAMA_NAMES,
        {"": 0, "model.layers": 1, "model.layers.10": 2, "lm_head": 5},
        [5, 0, 1, 2, 0],
    ),
    "prefix-matches-whole-components": (
        LLAMA_NAMES, {"model.layers.1": 1, "model": 0, "lm_head.weight": 2}, [2, 0, 1, 0, 0],
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("tensors", "device_map", "expected"), ASSIGN_CASES.values(), ids=ASSIGN_CASES.keys()
)
def test_assign_devices(
    tensors: list[tuple[str, int]], device_map: Any, expected: list[int]
) -> None:
    assert assign_devices(tensors, device_map) == expected


ASSIGN_ERRORS: dict[str, tuple[Any, str]] = {
    "zero-devices": (0, "1..1024"),
    "too-many-devices": (1025, "1..1024"),
    "bool": (True, "must be None, an int or a mapping"),
    "string": ("2", "must be None, an int or a mapping"),
    "list": ([0, 1], "must be None, an int or a mapping"),
    "unplaced": ({"model": 0}, "no device for tensor 'lm_head.weight'"),
    "negative-device": ({"": -1}, "negative device"),
    "device-not-int": ({"": "cuda:0"}, "is not str -> int"),
    "device-bool": ({"": True}, "is not str -> int"),
}


@pytest.mark.parametrize(
    ("device_map", "message"), ASSIGN_ERRORS.values(), ids=ASSIGN_ERRORS.keys()
)
def test_assign_devices_rejects(device_map: Any, message: str) -> None:
    with pytest.raises(ConversionError, match=re.escape(message)):
        assign_devices(LLAMA_NAMES, device_map)


# ------------------------------------------------------------------ plan (pure)
P = Placement
BIG = 64 * 1024
PLAN_CASES: dict[str, tuple[list[tuple[str, int, int]], list[Placement], list[int]]] = {
    "nothing": ([], [], []),
    "one-small": ([("a", 10, 0)], [P(0, 0)], [PAGE]),
    "small-packed-at-64": ([("a", 10, 0), ("b", 10, 0), ("c", 64, 0)],
                           [P(0, 0), P(0, 64), P(0, 128)], [PAGE]),
    "large-on-a-page": ([("a", 10, 0), ("big", BIG, 0), ("c", 1, 0)],
                        [P(0, 0), P(0, PAGE), P(0, PAGE + BIG)], [PAGE + BIG + PAGE]),
    # 64 + 65535 = 65599 bytes, rounded up to 17 pages.
    "just-below-large-is-packed": ([("a", 10, 0), ("b", BIG - 1, 0)],
                                   [P(0, 0), P(0, 64)], [17 * PAGE]),
    "empty-tensor": ([("e", 0, 0)], [P(0, 0)], [0]),
    "partitions-independent": ([("a", 100, 0), ("b", 100, 1), ("c", 100, 0)],
                               [P(0, 0), P(1, 0), P(0, 128)], [PAGE, PAGE]),
    "only-second-partition": ([("a", 10, 1)], [P(1, 0)], [0, PAGE]),
    "exact-page-end": ([("a", PAGE, 0), ("e", 0, 0)], [P(0, 0), P(0, PAGE)], [PAGE]),
}  # fmt: skip


@pytest.mark.parametrize(
    ("tensors", "placements", "sizes"), PLAN_CASES.values(), ids=PLAN_CASES.keys()
)
def test_plan(
    tensors: list[tuple[str, int, int]], placements: list[Placement], sizes: list[int]
) -> None:
    assert plan(tensors) == (placements, sizes)

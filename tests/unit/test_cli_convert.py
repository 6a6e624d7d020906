"""`sllm model convert`: what a user sees on success, and on every kind of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sllm import tiny_models
from sllm.cli import main
from sllm.native_loader import load, read_manifest


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return tiny_models.build_tiny_model("gpt2", tmp_path_factory.mktemp("cli") / "gpt2")


@pytest.fixture(scope="module")
def expected(hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The tensors of `hf_folder`, as the library converts them."""
    from sllm.native_loader import convert

    dst = tmp_path_factory.mktemp("lib") / "ckpt"
    convert(hf_folder, dst)
    return load(dst)


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["model", "convert", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is never the intended user experience
    return result.exit_code, result.output


def assert_loads_like(dst: Path, expected: dict[str, torch.Tensor]) -> None:
    tensors = load(dst)
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), name


def test_convert_prints_what_it_did_and_writes_a_loadable_checkpoint(
    tmp_path: Path, hf_folder: Path, expected: dict[str, torch.Tensor]
) -> None:
    dst = tmp_path / "out"

    code, output = run_cli(str(hf_folder), str(dst), "--quiet")

    assert code == 0, output
    manifest = read_manifest(dst)
    assert f"converted {hf_folder} -> {dst}" in output
    assert f"{len(manifest.tensors)} tensors" in output
    assert "1 partition(s)" in output
    assert f"{len(manifest.files)} extra file(s)" in output
    assert_loads_like(dst, expected)
    assert (dst / "config.json").is_file()


def test_convert_with_progress_shows_a_progress_bar(tmp_path: Path, hf_folder: Path) -> None:
    code, output = run_cli(str(hf_folder), str(tmp_path / "out"), "--progress")

    assert code == 0, output
    assert "convert:" in output and "100%" in output


def test_convert_as_a_real_subprocess(
    tmp_path: Path, hf_folder: Path, expected: dict[str, torch.Tensor]
) -> None:
    dst = tmp_path / "out"

    proc = subprocess.run(
        [sys.executable, "-m", "sllm", "model", "convert", str(hf_folder), str(dst), "-q"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    assert f"converted {hf_folder} -> {dst}" in proc.stdout
    assert_loads_like(dst, expected)


@pytest.mark.parametrize(
    ("device_map", "partitions"),
    [("2", 2), ('{"transformer.h.0": 0, "": 1}', 2), ('{"": 0}', 1)],
    ids=["count", "json-prefixes", "json-catch-all"],
)
def test_device_map_option(
    tmp_path: Path,
    hf_folder: Path,
    expected: dict[str, torch.Tensor],
    device_map: str,
    partitions: int,
) -> None:
    dst = tmp_path / "out"

    code, output = run_cli(str(hf_folder), str(dst), "--device-map", device_map, "-q")

    assert code == 0, output
    assert f"{partitions} partition(s)" in output
    assert len(read_manifest(dst).partitions) == partitions
    assert_loads_like(dst, expected)


def test_chunk_size_option(tmp_path: Path, hf_folder: Path) -> None:
    code, output = run_cli(str(hf_folder), str(tmp_path / "out"), "--chunk-size", "8192", "-q")

    assert code == 0, output
    assert read_manifest(tmp_path / "out").chunk_size == 8192


def test_missing_source_is_a_usage_error(tmp_path: Path) -> None:
    code, output = run_cli(str(tmp_path / "nope"), str(tmp_path / "out"))

    assert code == 2
    assert "does not exist" in output and "nope" in output
    assert not (tmp_path / "out").exists()


def test_source_without_weights_fails_cleanly(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()

    code, output = run_cli(str(empty), str(tmp_path / "out"))

    assert code == 1
    assert output.startswith("Error:") and "no *.safetensors" in output
    assert "Traceback" not in output


def test_existing_destination_needs_overwrite(tmp_path: Path, hf_folder: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")

    code, output = run_cli(str(hf_folder), str(dst), "-q")

    assert code != 0
    assert "already exists" in output and "overwrite" in output
    assert (dst / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_the_destination(
    tmp_path: Path, hf_folder: Path, expected: dict[str, torch.Tensor]
) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")

    code, output = run_cli(str(hf_folder), str(dst), "--overwrite", "-q")

    assert code == 0, output
    assert not (dst / "stale.txt").exists()
    assert_loads_like(dst, expected)


def test_existing_destination_message_names_the_cli_flag(tmp_path: Path, hf_folder: Path) -> None:
    (tmp_path / "out").mkdir()

    code, output = run_cli(str(hf_folder), str(tmp_path / "out"), "-q")

    assert code == 1
    assert "--overwrite" in output


@pytest.mark.parametrize("device_map", ["abc", "-1", "0", "[0, 1]", "{not json", '"2"'])
def test_bad_device_map_is_a_usage_error(tmp_path: Path, hf_folder: Path, device_map: str) -> None:
    code, output = run_cli(str(hf_folder), str(tmp_path / "out"), "--device-map", device_map)

    assert code == 2
    assert "Usage:" in output and "device count of at least 1 or a JSON object" in output
    assert not (tmp_path / "out").exists()


def test_bad_device_map_error_names_the_option(tmp_path: Path, hf_folder: Path) -> None:
    code, output = run_cli(str(hf_folder), str(tmp_path / "out"), "--device-map", "abc")

    assert code == 2
    assert "--device-map" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device-map", '{"": "x"}'], "is not str -> int"),
        (["--device-map", '{"transformer.h": 0}'], "places no device for tensor"),
        (["--chunk-size", "1000"], "multiple of 4096"),
    ],
    ids=["device-not-int", "unplaced-tensor", "chunk-size"],
)
def test_invalid_values_fail_with_the_library_message(
    tmp_path: Path, hf_folder: Path, args: list[str], message: str
) -> None:
    code, output = run_cli(str(hf_folder), str(tmp_path / "out"), "-q", *args)

    assert code == 1
    assert output.startswith("Error:") and message in output
    assert not (tmp_path / "out").exists()

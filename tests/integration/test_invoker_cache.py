"""An invoker's cache folder under stress: too small, deleted, failing to publish, shared."""

from __future__ import annotations

import errno
import logging
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import sllm.invoker._cachelock as cachelock_mod
import sllm.invoker._download as download_mod
import sllm.invoker._nvme as nvme_mod
from sllm.core.errors import Unavailable
from sllm.core.messages import LoadReport
from sllm.invoker import CacheFolderBusy, CacheLock, Invoker, InvokerConfig, cache_key
from sllm.store import PublishedModel, open_store, push_model
from sllm.tiny_models import build_tiny_model
from tests.support.invoker import InvokerProcess


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A folder store with a small (fp16) and a large (fp32) tiny llama."""
    root = tmp_path_factory.mktemp("cache-store")
    uri = f"file://{root / 'store'}"
    store = open_store(uri)
    models: dict[str, PublishedModel] = {}
    for name, dtype, seed in (("small", torch.float16, 0), ("large", torch.float32, 1)):
        src = build_tiny_model("llama", root / f"hf-{name}", seed=seed, dtype=dtype)
        models[name] = push_model(str(src), name, store, progress=False).model
    assert models["small"].total_bytes < models["large"].total_bytes
    return {"uri": uri, "models": models}


@pytest.fixture
def make_invoker(published: dict[str, Any], tmp_path: Path) -> Iterator[Any]:
    """Build in-process CPU invokers over `tmp_path/cache`; all closed at the end."""
    made: list[Invoker] = []

    def make(**overrides: Any) -> Invoker:
        config = InvokerConfig(
            token="t",
            cache_dir=tmp_path / "cache",
            store_uri=published["uri"],
            device="cpu",
            measure_bandwidth=False,
        ).replace(**overrides)
        invoker = Invoker(config)
        made.append(invoker)
        return invoker

    yield make
    for invoker in made:
        invoker.close()


def load(invoker: Invoker, function: str, model: str) -> LoadReport:
    return invoker.load({"function": function, "model": model})


def nvme_models(invoker: Invoker) -> list[str]:
    return [str(m["key"]).split("@")[0] for m in invoker.status()["tiers"]["nvme"]["models"]]


def to_remote(invoker: Invoker, function: str, model: str) -> None:
    """Unload `function` and drop `model`'s DRAM copy, so the next load reads a lower tier."""
    invoker.unload(function)
    invoker.evict({"model": model, "tier": "dram"})


def fail_fsync_once(monkeypatch: pytest.MonkeyPatch, at: Callable[[Path], bool]) -> list[Path]:
    """Make the NVMe tier's first fsync of a folder for which `at` holds fail with EIO; the
    list it returns names that folder once it has failed."""
    real = nvme_mod.fsync_dir
    failed: list[Path] = []

    def fsync_dir(path: Path) -> None:
        if at(path) and not failed:
            failed.append(path)
            raise OSError(errno.EIO, "Input/output error (simulated)", str(path))
        real(path)

    monkeypatch.setattr(nvme_mod, "fsync_dir", fsync_dir)
    return failed


def test_model_larger_than_nvme_streams_through_without_unloading(
    published: dict[str, Any], make_invoker: Any
) -> None:
    models = published["models"]
    nvme = (models["small"].total_bytes + models["large"].total_bytes) // 2
    invoker = make_invoker(nvme_capacity=nvme)
    assert load(invoker, "t/small", "small").tier == "remote"

    report = load(invoker, "t/large", "large")

    assert report.tier == "remote"
    # Unloading cannot free NVMe: the idle instance of "small" stays loaded.
    assert [i["function"] for i in invoker.status()["instances"]] == ["t/small", "t/large"]
    assert nvme_models(invoker) == ["small"]  # "large" lives in DRAM only
    assert not any(invoker.nvme.partial_dir.iterdir())
    assert invoker.nvme.used_bytes <= nvme


@pytest.mark.parametrize("deleted", [".", "nvme"], ids=["whole-cache-folder", "nvme-subfolder"])
def test_deleted_cache_folder_heals(make_invoker: Any, tmp_path: Path, deleted: str) -> None:
    invoker = make_invoker()
    load(invoker, "t/small", "small")
    to_remote(invoker, "t/small", "small")
    assert nvme_models(invoker) == ["small"]

    shutil.rmtree(tmp_path / "cache" / deleted)

    assert nvme_models(invoker) == []  # status no longer lists what is gone
    assert invoker.status()["tiers"]["nvme"]["used_bytes"] == 0
    assert load(invoker, "t/small", "small").tier == "remote"
    assert load(invoker, "t/large", "large").tier == "remote"
    assert nvme_models(invoker) == ["small", "large"]
    assert (invoker.nvme.path(cache_key(invoker.tiers.resolve("large"))) / "data.0").is_file()


def test_unusable_cache_folder_fails_clearly_until_it_heals(
    make_invoker: Any, tmp_path: Path
) -> None:
    invoker = make_invoker()
    load(invoker, "t/small", "small")
    to_remote(invoker, "t/small", "small")
    shutil.rmtree(tmp_path / "cache")
    (tmp_path / "cache").write_text("not a folder")  # nothing can be made under it

    with pytest.raises(Unavailable, match=r"cache folder .*cache is unusable"):
        load(invoker, "t/small", "small")
    assert nvme_models(invoker) == []

    (tmp_path / "cache").unlink()
    assert load(invoker, "t/small", "small").tier == "remote"
    assert nvme_models(invoker) == ["small"]


def test_failed_nvme_publish_serves_from_memory_and_resumes_later(
    make_invoker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    invoker = make_invoker()
    failed = fail_fsync_once(monkeypatch, lambda path: path.parent == invoker.nvme.partial_dir)

    first = load(invoker, "t/small", "small")

    assert failed and first.tier == "remote"  # the verified bytes in memory were served
    assert nvme_models(invoker) == []
    to_remote(invoker, "t/small", "small")
    again = load(invoker, "t/small", "small")
    assert again.tier == "remote"
    # The partial copy was kept with its journal: nothing is fetched twice.
    assert again.fetched_bytes == 0 and again.resumed_bytes == first.fetched_bytes > 0
    assert nvme_models(invoker) == ["small"]


def test_failed_sync_after_the_publish_rename_keeps_the_nvme_copy(
    make_invoker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the renamed copy was on disk but forgotten, so the next load went remote."""
    invoker = make_invoker()
    failed = fail_fsync_once(monkeypatch, lambda path: path == invoker.nvme.complete_dir)

    assert load(invoker, "t/small", "small").tier == "remote"
    assert failed and nvme_models(invoker) == ["small"]
    to_remote(invoker, "t/small", "small")
    assert load(invoker, "t/small", "small").tier == "nvme"


def test_second_invoker_on_a_cache_folder_is_refused(make_invoker: Any, tmp_path: Path) -> None:
    first = make_invoker()
    with pytest.raises(CacheFolderBusy, match=r"cache folder .*cache is in use by another invoker"):
        make_invoker()
    first.close()
    make_invoker()  # free once the holder is gone


def test_cache_folder_deleted_under_an_invoker_is_locked_again(
    make_invoker: Any, tmp_path: Path
) -> None:
    """Regression: the lock file went with the folder, so a second invoker could share it."""
    first = make_invoker()
    shutil.rmtree(tmp_path / "cache")
    assert nvme_models(first) == []  # any lookup remakes the folder
    with pytest.raises(CacheFolderBusy, match=r"cache folder .*cache is in use"):
        make_invoker()


def test_a_folder_lost_to_another_invoker_is_left_to_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: every lookup logged the loss again, and the tier went on evicting and
    publishing in the other invoker's folder."""
    root = tmp_path / "cache"
    lock = CacheLock.acquire(root)
    nvme = nvme_mod.NvmeTier(root, 1 << 20, lock=lock)
    (nvme.begin("m@1", 10) / "manifest.json").write_text("{}")
    nvme.publish("m@1")
    shutil.rmtree(root)
    other = CacheLock.acquire(root)  # another invoker takes the folder, with its own copy of m
    (root / "nvme" / "m@1").mkdir(parents=True)
    (root / "nvme" / "m@1" / "manifest.json").write_text("{}")
    try:
        with caplog.at_level(logging.ERROR, logger="sllm.invoker"):
            assert not any(nvme.contains("m@1") for _ in range(3))
            assert not nvme.evict("m@1")
            with pytest.raises(OSError, match="held by another invoker"):
                nvme.begin("n@1", 10)
        assert len([r for r in caplog.records if "lost its lock" in r.getMessage()]) == 1
        assert (root / "nvme" / "m@1" / "manifest.json").is_file()
        assert not (root / "partial" / "n@1").exists()
    finally:
        other.release()
    assert nvme.contains("m@1")  # locked again: the tier is back
    nvme.begin("n@1", 10)
    lock.release()


def test_failed_lock_claim_leaves_the_folder_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a failed pid write kept the flock, so a retry found the folder busy."""

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    with monkeypatch.context() as m:
        m.setattr(cachelock_mod.os, "pwrite", pwrite)
        with pytest.raises(OSError, match="No space"):
            CacheLock.acquire(tmp_path / "cache")
    CacheLock.acquire(tmp_path / "cache").release()


def test_a_cache_folder_that_cannot_be_made_is_a_cli_error(
    published: dict[str, Any], tmp_path: Path
) -> None:
    """Regression: the CacheLock's OSError came out of `sllm invoker start` as a traceback."""
    from click.testing import CliRunner

    from sllm.cli import main

    (tmp_path / "file").write_text("not a folder")
    args = ["invoker", "start", "--token", "t", "--store", published["uri"], "--device", "cpu"]
    result = CliRunner().invoke(
        main,
        [*args, "--no-measure", "--cache-dir", str(tmp_path / "file" / "cache")],
        catch_exceptions=False,
    )

    assert result.exit_code == 1, result.output
    assert "cannot start the invoker" in result.output and "file/cache" in result.output


def test_an_invoker_that_fails_to_start_leaves_the_folder_free(
    make_invoker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: only the NVMe tier's failure released the lock; a failed HostPool kept it."""
    import sllm.invoker._service as service_mod

    def failing_pool(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError("cannot reserve the host pool (simulated)")

    with monkeypatch.context() as m:
        m.setattr(service_mod, "HostPool", failing_pool)
        with pytest.raises(MemoryError, match="simulated"):
            make_invoker()
    make_invoker()  # the folder is free again: no CacheFolderBusy


@pytest.mark.invoker
def test_second_invoker_process_on_a_cache_folder_refuses_to_start(
    published: dict[str, Any], tmp_path: Path
) -> None:
    cache = tmp_path / f"shared-{uuid.uuid4().hex[:6]}"
    first = InvokerProcess(cache, published["uri"], extra=("--no-measure",)).start()
    try:
        second = InvokerProcess(cache, published["uri"], extra=("--no-measure",))
        with pytest.raises(RuntimeError, match=r"exited with 1:[\s\S]*in use by another invoker"):
            second.start()
        with first.client() as client:
            r = client.post("/v1/load", json={"function": "t/small", "model": "small"})
            assert r.status_code == 200, r.text
            assert client.get("/v1/status").json()["tiers"]["nvme"]["models"]
    finally:
        first.stop()


@pytest.mark.parametrize(
    "deleted", [".", "partial"], ids=["whole-cache-folder", "partial-subfolder"]
)
def test_cache_folder_deleted_during_a_download_still_serves_and_heals(
    make_invoker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deleted: str
) -> None:
    """Regression: the load failed (FileNotFoundError), or published a copy without its data."""
    invoker = make_invoker()
    store = invoker.tiers.store
    real = store.get_range_into
    wiped: list[bool] = []

    def get_range_into(key: str, offset: int, view: Any) -> Any:
        if not wiped:  # the operator wipes the cache while the first part is on the wire
            wiped.append(True)
            shutil.rmtree(tmp_path / "cache" / deleted)
        return real(key, offset, view)

    monkeypatch.setattr(store, "get_range_into", get_range_into)

    assert load(invoker, "t/small", "small").tier == "remote"  # the bytes in memory are fine
    assert wiped and nvme_models(invoker) == []
    monkeypatch.undo()
    to_remote(invoker, "t/small", "small")
    assert load(invoker, "t/small", "small").tier == "remote"
    assert nvme_models(invoker) == ["small"]


def test_disk_error_while_writing_the_nvme_copy_serves_from_memory(
    make_invoker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a full disk failed the load although the verified bytes were in memory."""
    invoker = make_invoker()

    def pwrite(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(download_mod.os, "pwrite", pwrite)
    report = load(invoker, "t/small", "small")
    assert report.tier == "remote" and report.fetched_bytes > 0
    assert nvme_models(invoker) == []
    _, events = invoker.invoke(
        {"function": "t/small", "model": "small", "prompt": "hi", "max_tokens": 2}
    )
    assert [e["event"] for e in events][-1] == "done"  # the model in memory serves
    monkeypatch.undo()
    to_remote(invoker, "t/small", "small")
    assert load(invoker, "t/small", "small").tier == "remote"
    assert nvme_models(invoker) == ["small"]

"""Publishing models: push_model, list_models, read_published and the `sllm model` CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sllm.cli import main
from sllm.core.errors import CorruptObject, InvalidRequest, NotFound, StoreError
from sllm.native_loader import convert, read_manifest
from sllm.store import (
    ObjectInfo,
    PublishedModel,
    Store,
    StoreSettings,
    list_models,
    open_store,
    push_model,
    read_published,
)
from sllm.tiny_models import build_tiny_model

CHUNK = 16 * 1024


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Hugging Face llama folder (config, tokenizer, model.safetensors)."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def hf_folder_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture with different weights."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("hf2") / "llama", seed=1)


@pytest.fixture(scope="module")
def converted(hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`hf_folder` converted with the default options."""
    dst = tmp_path_factory.mktemp("ckpt") / "llama"
    convert(hf_folder, dst)
    return dst


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, file_store_uri: str) -> Store:
    """An empty store of each backend."""
    if request.param == "file":
        return open_store(file_store_uri)
    uri, settings = request.getfixturevalue("s3_store_uri")
    return open_store(uri, settings)


def snapshot(store: Store) -> dict[str, ObjectInfo]:
    return {info.key: info for info in store.list("")}


def assert_published_as(store: Store, model: PublishedModel, folder: Path) -> None:
    """Every file of `folder` is in the store under the model's prefix, byte for byte."""
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(f.path for f in model.files) == local
    for f in model.files:
        assert store.get_bytes(model.key(f.path)) == (folder / f.path).read_bytes(), f.path
    assert model.total_bytes == sum((folder / p).stat().st_size for p in local)


def test_push_a_converted_folder(store: Store, converted: Path) -> None:
    result = push_model(str(converted), "llama", store, progress=False)

    model = result.model
    assert result.uploaded and not result.unchanged
    assert result.bytes_uploaded == model.total_bytes
    assert model.prefix == f"models/llama/{model.digest}/"
    assert model.format_version == read_manifest(converted).version
    assert model.pushed_at.endswith("Z")
    assert_published_as(store, model, converted)
    assert read_published(store, "llama") == model
    assert list_models(store) == [model]
    pointer = json.loads(store.get_bytes("models/llama/published.json"))
    assert pointer == model.to_json()
    assert set(pointer) == {"name", "digest", "total_bytes", "files", "format_version", "pushed_at"}


def test_push_an_hf_folder_converts_it_and_is_content_addressed(
    store: Store, hf_folder: Path, converted: Path
) -> None:
    from_hf = push_model(str(hf_folder), "from-hf", store, progress=False).model
    from_ckpt = push_model(str(converted), "from-ckpt", store, progress=False).model

    assert from_hf.digest == from_ckpt.digest  # same bytes, same digest
    assert {"config.json", "tokenizer.json", "manifest.json", "data.0"} <= {
        f.path for f in from_hf.files
    }
    assert [m.name for m in list_models(store)] == ["from-ckpt", "from-hf"]


def test_push_a_safetensors_file_with_conversion_options(
    store: Store, hf_folder: Path, tmp_path: Path
) -> None:
    model = push_model(
        str(hf_folder / "model.safetensors"),
        "bare",
        store,
        progress=False,
        device_map=2,
        chunk_size=CHUNK,
        workdir=tmp_path / "work",
    ).model

    assert sorted(f.path for f in model.files) == ["data.0", "data.1", "manifest.json"]
    manifest = json.loads(store.get_bytes(model.key("manifest.json")))
    assert manifest["chunk_size"] == CHUNK
    assert list((tmp_path / "work").iterdir()) == []  # the temporary conversion is gone


def test_repush_of_the_same_content_writes_nothing(store: Store, hf_folder: Path) -> None:
    first = push_model(str(hf_folder), "llama", store, progress=False)
    before = snapshot(store)
    watched = WritesCounter(store)

    again = push_model(str(hf_folder), "llama", watched, progress=False)  # type: ignore[arg-type]

    assert again.unchanged and not again.uploaded and again.bytes_uploaded == 0
    assert again.model == first.model  # same pointer, same pushed_at
    assert watched.writes == 0
    assert snapshot(store) == before  # keys, sizes and etags unchanged


def test_push_of_new_content_flips_the_pointer_and_keeps_the_old_version(
    store: Store, hf_folder: Path, hf_folder_v2: Path
) -> None:
    old = push_model(str(hf_folder), "llama", store, progress=False).model
    old_objects = {k: v for k, v in snapshot(store).items() if k.startswith(old.prefix)}

    new = push_model(str(hf_folder_v2), "llama", store, progress=False).model

    assert new.digest != old.digest
    assert read_published(store, "llama") == new
    assert {k: v for k, v in snapshot(store).items() if k.startswith(old.prefix)} == old_objects
    assert [m.digest for m in list_models(store)] == [new.digest]

    # Back to the old content: its digest folder is complete, so only the pointer is written.
    back = push_model(str(hf_folder), "llama", store, progress=False)
    assert not back.uploaded and not back.unchanged and back.bytes_uploaded == 0
    assert read_published(store, "llama").digest == old.digest


class WritesCounter:
    """Delegates to a store and counts the writes made through it."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.writes = 0

    def put_file(self, key: str, path: Path, *, progress: object = None) -> None:
        self.writes += 1
        self.inner.put_file(key, path)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.writes += 1
        self.inner.put_bytes(key, data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class FailingStore:
    """Delegates to a store but fails the n-th put_file, like a connection dropped mid-push."""

    def __init__(self, inner: Store, fail_at: int) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.fail_at = fail_at
        self.puts = 0

    def put_file(self, key: str, path: Path, *, progress: object = None) -> None:
        self.puts += 1
        if self.puts == self.fail_at:
            raise StoreError("simulated connection reset")
        self.inner.put_file(key, path)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_an_interrupted_push_publishes_nothing_and_resumes(store: Store, hf_folder: Path) -> None:
    failing = FailingStore(store, fail_at=3)
    with pytest.raises(StoreError, match="simulated"):
        push_model(str(hf_folder), "llama", failing, progress=False)  # type: ignore[arg-type]

    with pytest.raises(NotFound, match="'llama' is not published"):
        read_published(store, "llama")
    assert list_models(store) == []
    assert store.stat("models/llama/published.json") is None

    result = push_model(str(hf_folder), "llama", store, progress=False)
    assert 0 < result.bytes_uploaded < result.model.total_bytes  # only what was missing
    assert read_published(store, "llama") == result.model


def test_an_interrupted_push_of_new_content_keeps_the_old_version_live(
    store: Store, hf_folder: Path, hf_folder_v2: Path
) -> None:
    old = push_model(str(hf_folder), "llama", store, progress=False).model
    with pytest.raises(StoreError):
        push_model(str(hf_folder_v2), "llama", FailingStore(store, 2), progress=False)  # type: ignore[arg-type]
    assert read_published(store, "llama") == old


def test_push_rejects_an_invalid_name_before_doing_anything(store: Store, converted: Path) -> None:
    with pytest.raises(InvalidRequest, match="invalid model name"):
        push_model(str(converted), "bad/name", store, progress=False)
    assert snapshot(store) == {}


def test_conversion_options_on_a_converted_folder_are_rejected(
    store: Store, converted: Path
) -> None:
    with pytest.raises(InvalidRequest, match="already converted"):
        push_model(str(converted), "x", store, progress=False, device_map=2)


def test_a_broken_source_is_an_invalid_request(store: Store, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest, match="cannot convert"):
        push_model(str(tmp_path / "empty"), "x", store, progress=False)


def test_unknown_hub_id_offline_names_the_id(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(NotFound, match=r"'nobody/no-such-model'.*Hugging Face"):
        push_model("nobody/no-such-model", "x", store, progress=False)
    with pytest.raises(NotFound, match="no such file"):
        push_model(str(tmp_path / "absent" / "dir"), "x", store, progress=False)


def test_a_mangled_pointer_is_corrupt_and_skipped_by_list(store: Store, converted: Path) -> None:
    good = push_model(str(converted), "good", store, progress=False).model
    store.put_bytes("models/bad/published.json", b"{not json")
    doc = good.to_json() | {"name": "other"}
    store.put_bytes("models/liar/published.json", json.dumps(doc).encode())

    with pytest.raises(CorruptObject, match="not valid JSON"):
        read_published(store, "bad")
    with pytest.raises(CorruptObject, match="names model 'other'"):
        read_published(store, "liar")
    assert list_models(store) == [good]
    # Pushing over a mangled pointer repairs it.
    assert push_model(str(converted), "bad", store, progress=False).model.name == "bad"
    assert read_published(store, "bad").digest == good.digest


# --- symlinks: inside the folder they are followed, out of it they are refused ------------


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def _redirect(path: Path, target: Path) -> None:
    """Replace `path` (file or folder) by a symlink to `target`, a copy of it."""
    if path.is_dir():
        shutil.copytree(path, target)
        shutil.rmtree(path)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        path.unlink()
    path.symlink_to(target)


@pytest.mark.parametrize(
    ("link", "rel"),
    [
        ("data.0", "data.0"),
        ("tokenizer.json", "tokenizer.json"),
        ("extra", "extra/notes.txt"),  # a folder symlink: the file under it is named
        ("extra/notes.txt", "extra/notes.txt"),
    ],
    ids=["partition", "file", "folder", "file-in-folder"],
)
def test_push_refuses_a_symlink_out_of_a_converted_folder(
    file_store_uri: str, hf_folder: Path, tmp_path: Path, link: str, rel: str
) -> None:
    src = _copy(hf_folder, tmp_path / "hf")
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("a file in a subfolder")
    folder = tmp_path / "ckpt"
    convert(src, folder)
    _redirect(folder / link, tmp_path / "elsewhere" / link)
    store = open_store(file_store_uri)

    with pytest.raises(InvalidRequest, match=rf"{rel} leads through a symlink to .*outside"):
        push_model(str(folder), "x", store, progress=False)

    assert snapshot(store) == {}


@pytest.mark.parametrize("rel", ["model.safetensors", "config.json"], ids=lambda r: r)
def test_push_refuses_a_symlink_out_of_a_folder_it_converts(
    file_store_uri: str, hf_folder: Path, tmp_path: Path, rel: str
) -> None:
    folder = _copy(hf_folder, tmp_path / "hf")
    _redirect(folder / rel, tmp_path / "elsewhere" / rel)
    store = open_store(file_store_uri)

    with pytest.raises(InvalidRequest, match=rf"{rel} leads through a symlink to .*outside"):
        push_model(str(folder), "x", store, progress=False)

    assert snapshot(store) == {}


def test_push_follows_symlinks_that_stay_inside_the_folder(
    file_store_uri: str, converted: Path, hf_folder: Path, tmp_path: Path
) -> None:
    ckpt = _copy(converted, tmp_path / "ckpt")
    _redirect(ckpt / "tokenizer.json", ckpt / "shared" / "tokenizer.json")
    hf = _copy(hf_folder, tmp_path / "hf")
    _redirect(hf / "model.safetensors", hf / "weights" / "model.safetensors")
    store = open_store(file_store_uri)

    pushed = push_model(str(ckpt), "ckpt", store, progress=False).model
    from_hf = push_model(str(hf), "hf", store, progress=False).model

    assert store.get_bytes(pushed.key("tokenizer.json")) == (ckpt / "tokenizer.json").read_bytes()
    assert from_hf.digest == push_model(str(hf_folder), "orig", store, progress=False).model.digest


def _hub_snapshot(hf_folder: Path, hub: Path) -> Path:
    """The hub cache's layout: files in blobs/, links to them from snapshots/REV/."""
    repo = hub / "models--org--tiny"
    snapshot_dir = repo / "snapshots" / "rev"
    snapshot_dir.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in hf_folder.iterdir():
        shutil.copyfile(path, repo / "blobs" / path.name)
        (snapshot_dir / path.name).symlink_to(Path("../../blobs") / path.name)
    return snapshot_dir


def test_a_hub_snapshot_may_link_into_its_cache_repository(
    file_store_uri: str, hf_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot_dir = _hub_snapshot(hf_folder, tmp_path / "hub")
    monkeypatch.setattr("sllm.store._source.download_from_hub", lambda *_a, **_k: snapshot_dir)
    store = open_store(file_store_uri)

    pushed = push_model("org/tiny", "tiny", store, progress=False).model

    assert pushed.digest == push_model(str(hf_folder), "orig", store, progress=False).model.digest


def test_a_local_hub_snapshot_folder_is_pushed_like_its_hub_id(
    file_store_uri: str, hf_folder: Path, tmp_path: Path
) -> None:
    """Regression: given as a path, a snapshot's links into ../../blobs were refused."""
    snapshot_dir = _hub_snapshot(hf_folder, tmp_path / "hub")
    store = open_store(file_store_uri)

    pushed = push_model(str(snapshot_dir), "tiny", store, progress=False).model

    assert pushed.digest == push_model(str(hf_folder), "orig", store, progress=False).model.digest


def test_cli_push_says_which_symlink_leaves_the_folder(
    file_store_uri: str, converted: Path, tmp_path: Path
) -> None:
    folder = _copy(converted, tmp_path / "ckpt")
    _redirect(folder / "data.0", tmp_path / "elsewhere" / "data.0")

    code, out = cli("model", "push", str(folder), "x", "--store", file_store_uri, "-q")

    assert code == 1
    assert f"data.0 leads through a symlink to {tmp_path / 'elsewhere' / 'data.0'}" in out
    assert "Traceback" not in out


# --- CLI ----------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is never the intended user experience
    return result.exit_code, result.output


def test_cli_push_and_list(file_store_uri: str, hf_folder: Path) -> None:
    code, out = cli("model", "push", str(hf_folder), "llama", "--store", file_store_uri, "-q")
    assert code == 0, out
    model = read_published(open_store(file_store_uri), "llama")
    assert out.strip() == f"pushed llama digest={model.digest} ({model.total_bytes} bytes)"

    code, out = cli("model", "push", str(hf_folder), "llama", "--store", file_store_uri)
    assert code == 0, out
    assert out.strip() == f"llama unchanged (digest {model.digest})"

    code, out = cli("model", "list", "--store", file_store_uri)
    assert code == 0, out
    header, row = out.strip().splitlines()
    assert header.split() == ["NAME", "DIGEST", "SIZE", "PUSHED"]
    assert row.split()[:2] == ["llama", model.digest[:12]]
    assert row.endswith(model.pushed_at)

    code, out = cli("model", "list", "--store", file_store_uri, "--json")
    assert code == 0, out
    assert json.loads(out) == [model.to_json()]


def test_cli_list_of_an_empty_store(file_store_uri: str) -> None:
    code, out = cli("model", "list", "--store", file_store_uri)
    assert code == 0 and "no models published" in out
    assert json.loads(cli("model", "list", "--store", file_store_uri, "--json")[1]) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("model", "push", "{src}", "bad/name", "--store", "{store}"), "invalid model name"),
        (("model", "push", "{src}", "ok", "--store", "ftp://x"), "unsupported scheme"),
        (("model", "push", "{src}", "ok", "--store", "s3://models"), "SLLM_S3_ENDPOINT"),
        (("model", "push", "/no/such/dir", "ok", "--store", "{store}"), "no such file"),
        (
            ("model", "push", "{src}", "ok", "--store", "{store}", "--device-map", "0"),
            "device count",
        ),
        (("model", "list", "--store", "file://relative"), "file:///path"),
    ],
    ids=["name", "scheme", "no-endpoint", "missing-src", "device-map", "relative-file"],
)
def test_cli_errors_are_one_line_messages(
    args: tuple[str, ...], message: str, converted: Path, file_store_uri: str
) -> None:
    argv = [a.format(src=converted, store=file_store_uri) for a in args]
    code, out = cli(*argv)
    assert code != 0
    assert message in out
    assert "Traceback" not in out


def test_cli_bad_s3_setting_names_the_variable(converted: Path) -> None:
    env = {"SLLM_S3_ENDPOINT": "127.0.0.1:9000", "SLLM_S3_SECURE": "perhaps"}
    code, out = cli("model", "list", "--store", "s3://models", env=env)
    assert code == 1 and "SLLM_S3_SECURE" in out


@pytest.mark.s3
def test_cli_push_to_s3_reads_the_environment(
    s3_store_uri: tuple[str, StoreSettings], converted: Path
) -> None:
    uri, settings = s3_store_uri
    env = {
        "SLLM_STORE_URI": uri,
        "SLLM_S3_ENDPOINT": str(settings.endpoint),
        "SLLM_S3_ACCESS_KEY": str(settings.access_key),
        "SLLM_S3_SECRET_KEY": str(settings.secret_key),
    }
    code, out = cli("model", "push", str(converted), "llama", "-q", env=env)
    assert code == 0, out
    assert out.startswith("pushed llama digest=")
    assert [m.name for m in list_models(open_store(uri, settings))] == ["llama"]


def test_cli_as_a_real_process(tmp_path: Path, hf_folder: Path) -> None:
    """`python -m sllm model push/list` with the default store under $SLLM_HOME."""
    env = {**os.environ, "SLLM_HOME": str(tmp_path / "home")}
    env.pop("SLLM_STORE_URI", None)
    push = subprocess.run(
        [sys.executable, "-m", "sllm", "model", "push", str(hf_folder), "tiny", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert push.returncode == 0, push.stderr
    assert push.stdout.startswith("pushed tiny digest=")
    assert (tmp_path / "home" / "store" / "models" / "tiny" / "published.json").is_file()

    listing = subprocess.run(
        [sys.executable, "-m", "sllm", "model", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0, listing.stderr
    assert [m["name"] for m in json.loads(listing.stdout)] == ["tiny"]

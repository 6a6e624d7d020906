"""Turn what a user hands `push_model` into a converted checkpoint folder.

a converted folder (has manifest.json)   used as is, after validating its manifest
an HF model folder or a .safetensors     converted into a temporary folder first
anything else                            a Hugging Face hub id: downloaded, then converted
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sllm.core.errors import InvalidRequest, NotFound, PlatformError

from ._published import MANIFEST

# What a model needs from a hub repository: weights, configs and tokenizer files. Pickled
# .bin weights are fetched only when a repository has no safetensors (they would double
# the download for the many repositories that ship both).
HUB_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "tokenizer*",
)
HUB_FALLBACK_PATTERNS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


@contextmanager
def converted_folder(
    src: str,
    *,
    progress: bool,
    device_map: Any = None,
    chunk_size: int | None = None,
    workdir: Path | None = None,
) -> Iterator[Path]:
    """Yield a converted checkpoint folder for `src`; temporary folders are removed afterwards."""
    # Imported here: the loader pulls in torch, which `sllm model list` never needs.
    from sllm.native_loader import LoaderError, convert, read_manifest

    path = Path(src).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        if device_map is not None or chunk_size is not None:
            raise InvalidRequest(
                f"{src} is already converted; a device map or chunk size applies only "
                "when converting (convert again with `sllm model convert`)"
            )
        try:
            read_manifest(path)
        except LoaderError as exc:
            raise InvalidRequest(f"{src}: not a valid converted checkpoint: {exc}") from exc
        yield path
        return
    # Files must come from inside the folder given (a hub snapshot: its repository).
    if not path.exists():
        path = download_from_hub(src, progress=progress)
    root = confinement_root(path) if path.is_dir() else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sllm-push-", dir=workdir) as tmp:
        dst = Path(tmp) / "model"
        kwargs: dict[str, Any] = {"device_map": device_map, "progress": progress, "within": root}
        if chunk_size is not None:
            kwargs["chunk_size"] = chunk_size
        try:
            convert(path, dst, **kwargs)
        except LoaderError as exc:
            raise InvalidRequest(f"cannot convert {src}: {exc}") from exc
        except OSError as exc:
            raise PlatformError(f"cannot convert {src} in {tmp}: {exc}") from exc
        yield dst


def confinement_root(folder: Path) -> Path:
    """The folder a model folder's files must stay in: itself, or for a Hugging Face cache
    snapshot (`.../models--ORG--NAME/snapshots/REV`, whose files link to `../../blobs`)
    its repository folder `models--ORG--NAME`.
    """
    resolved = folder.resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        return resolved.parent.parent
    return folder


def download_from_hub(repo_id: str, *, progress: bool) -> Path:
    """Fetch a model's weights, configs and tokenizer from the Hugging Face hub (or its cache)."""
    if not _HUB_ID.fullmatch(repo_id) or ".." in repo_id:
        raise NotFound(f"{repo_id}: no such file or folder (nor a Hugging Face model id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(HUB_PATTERNS)))
        if not any(folder.glob("*.safetensors")):
            folder = Path(
                snapshot_download(repo_id, allow_patterns=[*HUB_PATTERNS, *HUB_FALLBACK_PATTERNS])
            )
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise NotFound(
            f"{repo_id!r} is not a local path, and the Hugging Face hub has no such model "
            "(or it is gated/private: log in with `hf auth login`)"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise NotFound(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face "
            f"hub (offline or unreachable, and not in the local cache): {exc}"
        ) from exc
    except HFValidationError as exc:
        raise InvalidRequest(f"{repo_id!r} is neither a local path nor a hub id: {exc}") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise PlatformError(
            f"downloading {repo_id!r} from the Hugging Face hub failed: {exc}"
        ) from exc
    del progress  # huggingface_hub draws its own bars; they follow HF_HUB_DISABLE_PROGRESS_BARS
    return folder

"""The cold-start benchmark's baselines, as the ServerlessLLM paper runs them.

- Ray Serve with a local cache: the safetensors folder is already on local
  SSD; a replica starts with `AutoTokenizer.from_pretrained` and
  `AutoModelForCausalLM.from_pretrained`, then runs the prompt.
- KServe: the storage initializer downloads the model folder from the object
  store into a fresh local folder (parallel ranged GETs, like boto3's
  `download_file`), then the server does the same as above.

Each returns the wall time from "request arrives" to the first token, and the token.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sllm.store import Store


@dataclass(frozen=True)
class FirstToken:
    """One timed start: seconds to the first token, the token, warm prefill times if taken,
    and (ours) the invoker's reported load time."""

    seconds: float
    token: int
    prefill: tuple[float, ...] = ()
    load_seconds: float | None = None


def start_from_folder(folder: Path, prompt: str, *, prefills: int = 0) -> FirstToken:
    """Tokenizer + model from `folder` (float32), then the prompt's first greedy token.

    With `prefills` > 0, the loaded model then runs the prompt's prefill that
    many more times (outside the TTFT; each timed on its own), the way our
    runtime does it: KV cache on, logits of the last position only.
    """
    gc.collect()
    start = time.perf_counter()
    model, ids, token = _load_and_run(folder, prompt)
    seconds = time.perf_counter() - start
    times = []
    with torch.inference_mode():
        for _ in range(prefills):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t)
    del model
    gc.collect()
    return FirstToken(seconds, token, tuple(times))


def _load_and_run(folder: Path, prompt: str) -> tuple[Any, torch.Tensor, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    ids = tokenizer(prompt, add_special_tokens=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        token = int(model(ids).logits[:, -1].argmax(-1)[0])
    return model, ids, token


def read_files(folder: Path) -> None:
    """Read every file of `folder` once, so it sits in the page cache."""
    for p in sorted(folder.iterdir()):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass


def download(store: Store, prefix: str, dst: Path, *, threads: int, part_size: int) -> int:
    """Download every object under `prefix` into `dst` with parallel ranged GETs; bytes fetched."""
    objects = list(store.list(prefix))
    dst.mkdir(parents=True, exist_ok=True)
    fds: dict[str, int] = {}
    jobs: list[tuple[str, int, int]] = []
    local = threading.local()
    try:
        for obj in objects:
            path = dst / obj.key[len(prefix) :]
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds[obj.key] = fd
            os.ftruncate(fd, obj.size)
            jobs += [
                (obj.key, at, min(part_size, obj.size - at)) for at in range(0, obj.size, part_size)
            ]

        def fetch(job: tuple[str, int, int]) -> None:
            key, offset, length = job
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = memoryview(bytearray(part_size))
            view = buf[:length]
            store.get_range_into(key, offset, view)
            done = 0
            while done < length:
                done += os.pwrite(fds[key], view[done:], offset + done)

        with ThreadPoolExecutor(threads, thread_name_prefix="kserve-download") as pool:
            list(pool.map(fetch, jobs))
    finally:
        for fd in fds.values():
            os.close(fd)
    return sum(o.size for o in objects)


def kserve_start(
    store: Store, prefix: str, dst: Path, prompt: str, *, threads: int, part_size: int
) -> FirstToken:
    """Download `prefix` into a fresh `dst`, then start from it; `dst` is removed afterwards."""
    shutil.rmtree(dst, ignore_errors=True)
    try:
        gc.collect()
        start = time.perf_counter()
        download(store, prefix, dst, threads=threads, part_size=part_size)
        model, _, token = _load_and_run(dst, prompt)
        seconds = time.perf_counter() - start
        del model
        gc.collect()
        return FirstToken(seconds, token)
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def upload_folder(store: Store, folder: Path, prefix: str) -> None:
    """Upload every file of `folder` under `prefix` (the baseline's copy in the object store)."""
    for p in sorted(folder.iterdir()):
        if p.is_file():
            store.put_file(prefix + p.name, p)


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder (for dropping them from the page cache)."""
    return sorted(p for p in folder.iterdir() if p.is_file())


def median(values: list[float] | tuple[float, ...]) -> float:
    """The median, or nan for no values."""
    return statistics.median(values) if values else float("nan")

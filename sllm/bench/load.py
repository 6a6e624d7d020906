"""`sllm bench load`: checkpoint loading, ours against the disk and the usual loaders.

One run generates an LLM-shaped checkpoint (bf16; attention and MLP
matrices, plus biases and norms so that over a third of the tensors are
under 1 MB), writes it as safetensors, as a torch.save file and in our
format, then measures in rounds. Each cold read is preceded by dropping the
files from the page cache (posix_fadvise DONTNEED), and the cold reads run
in an order shuffled anew every round (seeded; the orders go in the JSON):

- fio: 4 MiB sequential O_DIRECT reads, libaio, queue depth 32, on our data
  file: the raw device bandwidth; also with one such job per CPU, each on its
  own slice of the file;
- ours cold: a load through a host pool with nothing mapped, as the invoker's
  DRAM tier is after start-up (the pool maps its buffers when a load needs
  them, so the read pays the kernel's page faults), until the CPU tensors are
  usable, every chunk CRC-checked; and ours into a buffer the pool already
  has mapped, as after an eviction (freed buffers stay mapped for the next
  load of a checkpoint of the same size);
- safetensors.torch.load_file cold with every byte touched (a CRC pass over
  the tensors, the same work our verification does), also with only every
  page touched, and with its pread backend; torch.load cold;
- warm: ours from the host pool (a DRAM-tier hit) against safetensors from
  the page cache, both with every page touched (its mmap'd tensors fault
  their pages in on first use), and both without;
- with CUDA: ours NVMe->GPU (through an empty pool, as above) and DRAM->GPU,
  safetensors to the GPU, and the pinned host->device copy bandwidth.

Every target compares two measurements that leave the same bytes touched
(`TOUCH` in `_load_report`; the JSON's `touched` and `target_pairs`). Times
are medians over the rounds; ratios are computed from the medians.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sllm.native_loader import HostPool, load, load_with_info, save_state_dict
from sllm.native_loader._engine import crc32c
from sllm.native_loader._read import DEFAULT_THREADS

from ._load_report import print_table, summarise
from ._results import write_results

MB = 1024 * 1024
PAGE = 4096


def llm_shapes(
    size_bytes: int, hidden: int = 2048, ffn: int = 5632, vocab: int = 32000
) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama/Qwen-like model of about `size_bytes` in bf16."""
    per_layer = (4 * hidden * hidden + 3 * hidden * ffn + 5 * hidden) * 2
    fixed = (2 * vocab * hidden + hidden) * 2
    layers = max(1, math.ceil((size_bytes - fixed) / per_layer))
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ("q", "k", "v", "o"):
            shapes.append((f"{p}.self_attn.{proj}_proj.weight", (hidden, hidden)))
        for proj in ("q", "k", "v"):
            shapes.append((f"{p}.self_attn.{proj}_proj.bias", (hidden,)))
        shapes.append((f"{p}.mlp.gate_proj.weight", (ffn, hidden)))
        shapes.append((f"{p}.mlp.up_proj.weight", (ffn, hidden)))
        shapes.append((f"{p}.mlp.down_proj.weight", (hidden, ffn)))
        shapes.append((f"{p}.input_layernorm.weight", (hidden,)))
        shapes.append((f"{p}.post_attention_layernorm.weight", (hidden,)))
    shapes.append(("model.norm.weight", (hidden,)))
    shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def make_state_dict(size_bytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 tensors in the shapes of `llm_shapes` (random bits, tiled from one block)."""
    gen = torch.Generator().manual_seed(seed)
    block = torch.randint(0, 256, (64 * MB,), dtype=torch.uint8, generator=gen)
    out = {}
    at = 0
    for name, shape in llm_shapes(size_bytes):
        n = math.prod(shape) * 2
        raw = torch.empty(n, dtype=torch.uint8)
        done = 0
        while done < n:
            take = min(n - done, block.numel() - at)
            raw[done : done + take] = block[at : at + take]
            done += take
            at = (at + take) % block.numel()
        out[name] = raw.view(torch.bfloat16).view(shape)
    return out


def drop_cache(paths: list[Path]) -> None:
    """Evict files from the page cache (they are clean, so this frees them)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def touch_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Read every byte of every tensor (a CRC32C pass); returns a value so it cannot be skipped."""
    acc = 0
    for t in tensors.values():
        if t.numel() and t.device.type == "cpu":
            acc ^= crc32c(t.reshape(-1).view(torch.uint8).numpy().data)
    return acc


def touch_pages(tensors: dict[str, torch.Tensor]) -> int:
    """Read one byte of every page of every tensor, so every byte is resident in memory."""
    acc = 0
    for t in tensors.values():
        if t.numel() and t.device.type == "cpu":
            acc += int(t.reshape(-1).view(torch.uint8)[::PAGE].sum())
    return acc


def fio_bandwidth(path: Path, jobs: int = 1) -> float | None:
    """fio's 4 MiB O_DIRECT sequential read bandwidth on `path` (bytes/s), or None without fio.

    With `jobs` > 1, that many fio jobs each read their own slice of the file
    (one submitting thread per CPU can drive more of a multi-queue device).
    """
    fio = shutil.which("fio")
    if fio is None:
        return None
    size = path.stat().st_size // jobs // (4 * MB) * (4 * MB) if jobs > 1 else path.stat().st_size
    cmd = [
        fio,
        "--name=seqread",
        f"--filename={path}",
        "--rw=read",
        "--bs=4M",
        "--direct=1",
        "--ioengine=libaio",
        "--iodepth=32",
        f"--size={size}",
        "--readonly",
        "--output-format=json",
    ]
    if jobs > 1:
        cmd += [f"--numjobs={jobs}", f"--offset_increment={size}", "--group_reporting"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    return float(json.loads(out.stdout)["jobs"][0]["read"]["bw_bytes"])


@contextlib.contextmanager
def timer(into: list[float]) -> Iterator[None]:
    """Append the block's wall time to `into`."""
    gc.collect()
    start = time.perf_counter()
    yield
    into.append(time.perf_counter() - start)


class Files:
    """The generated checkpoint in its three forms."""

    def __init__(self, workdir: Path, size_bytes: int, echo: Callable[[str], None]) -> None:
        self.dir = workdir / f"ckpt-{size_bytes // MB}MB"
        self.safetensors = self.dir / "model.safetensors"
        self.torch = self.dir / "model.pt"
        self.ours = self.dir / "sllm"
        stamp = self.dir / "complete"
        if stamp.exists():
            echo(f"reusing checkpoints in {self.dir}")
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        echo(f"generating a {size_bytes / 1e9:.2f} GB checkpoint in {self.dir} ...")
        from safetensors.torch import save_file

        sd = make_state_dict(size_bytes)
        save_file(sd, self.safetensors)
        torch.save(sd, self.torch)
        save_state_dict(sd, self.ours, progress=True)
        del sd
        stamp.write_text("ok\n")

    @property
    def ours_data(self) -> list[Path]:
        return sorted(self.ours.glob("data.*"))

    def all(self) -> list[Path]:
        return [self.safetensors, self.torch, *self.ours_data]


def cold_orders(names: Sequence[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """One shuffled order of `names` per round, reproducible from `seed`.

    A fixed or rotated order always puts the same reader after the same one (ours
    right after fio's full read of the same file, say); a virtual disk may cache
    below the guest's page cache, so each round draws a fresh order instead.
    """
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        orders.append(order)
    return orders


def run(
    *,
    size_gb: float,
    rounds: int,
    workdir: Path,
    out: Path,
    threads: int | None,
    keep: bool,
    echo: Callable[[str], None],
    seed: int = 0,
) -> dict[str, Any]:
    """Run the benchmark, print a table, write JSON to `out`; returns the results."""
    from safetensors.torch import load_file

    size_bytes = int(size_gb * 1e9)
    files = Files(workdir, size_bytes, echo)
    nbytes = sum(p.stat().st_size for p in files.ours_data)
    sizes = [p.stat().st_size for p in files.ours_data]
    ntensors = len(load(files.ours, verify="never"))
    threads = threads or DEFAULT_THREADS
    # The invoker's DRAM tier: a pool that maps memory when a load needs it.
    pool = HostPool(int(nbytes * 1.5) + 64 * MB, threads=threads)
    cuda = torch.cuda.is_available()
    t: dict[str, list[float]] = {}
    fio: list[float] = []
    fio_jobs: list[float] = []
    mapped_before: dict[str, list[int]] = {}
    cpus = os.cpu_count() or 1

    def cold(name: str, fn: Callable[[], object]) -> None:
        drop_cache(files.all())
        with timer(t.setdefault(name, [])):
            fn()

    def fio_round() -> None:
        drop_cache(files.all())
        bw = fio_bandwidth(files.ours_data[0])
        if bw is not None:
            fio.append(bw)
        if cpus > 1:
            drop_cache(files.all())
            bw = fio_bandwidth(files.ours_data[0], jobs=cpus)
            if bw is not None:
                fio_jobs.append(bw)

    def ours(name: str, device: str = "cpu", *, reuse: bool = False) -> Callable[[], None]:
        def step() -> None:
            fresh = HostPool(pool.capacity, threads=threads)  # as after the invoker's start
            if reuse:  # as after an eviction: the freed buffers stay mapped for the next load
                fresh.reserve(sizes)
            mapped_before.setdefault(name, []).append(fresh.used_bytes)
            cold(name, lambda: _sync(load(files.ours, device, pool=fresh, threads=threads)))

        return step

    steps: dict[str, Callable[[], None]] = {
        "fio": fio_round,
        "ours_cold": ours("ours_cold"),
        "ours_cold_reused_buffer": ours("ours_cold_reused_buffer", reuse=True),
        "safetensors_cold_every_byte": lambda: cold(
            "safetensors_cold_every_byte", lambda: touch_bytes(load_file(files.safetensors))
        ),
        "safetensors_cold_every_page": lambda: cold(
            "safetensors_cold_every_page", lambda: touch_pages(load_file(files.safetensors))
        ),
        "safetensors_pread_cold_every_byte": lambda: cold(
            "safetensors_pread_cold_every_byte",
            lambda: touch_bytes(load_file(files.safetensors, backend="pread")),
        ),
        "torch_load_cold": lambda: cold(
            "torch_load_cold", lambda: torch.load(files.torch, weights_only=True)
        ),
    }
    if cuda:
        steps["ours_nvme_to_gpu"] = ours("ours_nvme_to_gpu", "cuda:0")
        steps["safetensors_cold_to_gpu"] = lambda: cold(
            "safetensors_cold_to_gpu",
            lambda: _sync(load_file(files.safetensors, device="cuda:0")),
        )
    orders = cold_orders(list(steps), rounds, seed)
    for r, order in enumerate(orders):
        echo(f"round {r + 1}/{rounds}: {', '.join(order)}")
        for name in order:
            steps[name]()
        _warm_round(files, pool, threads, t)
        if cuda:
            _cuda_warm_round(files, pool, t)
        pool.evict(files.ours)

    shapes = llm_shapes(size_bytes)
    results = summarise(t, fio, fio_jobs, nbytes, ntensors, rounds, threads, shapes)
    results["cold_order"] = {"seed": seed, "rounds": orders}
    results["pool_bytes_mapped_before_cold_read"] = mapped_before
    print_table(results, echo)
    write_results(out, results, echo)
    if not keep:
        shutil.rmtree(files.dir, ignore_errors=True)
    return results


def _sync(x: object) -> object:
    """`x`, once the device has finished the copies that made it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x


def _warm_round(files: Files, pool: HostPool, threads: int, t: dict[str, list[float]]) -> None:
    """Ours from the pool (a DRAM-tier hit) and safetensors from the page cache, each
    untouched and with every page touched."""
    from safetensors.torch import load_file

    load(files.ours, pool=pool, threads=threads)
    with timer(t.setdefault("ours_dram_hit", [])):
        info = load_with_info(files.ours, pool=pool)
    assert info.hit, "the warm load must be a pool hit"
    del info
    with timer(t.setdefault("ours_dram_hit_every_page", [])):
        touch_pages(load(files.ours, pool=pool))
    touch_pages(load_file(files.safetensors))
    with timer(t.setdefault("safetensors_warm_page_cache", [])):
        touch_pages(load_file(files.safetensors))
    with timer(t.setdefault("safetensors_warm_page_cache_untouched", [])):
        load_file(files.safetensors)


def _cuda_warm_round(files: Files, pool: HostPool, t: dict[str, list[float]]) -> None:
    from safetensors.torch import load_file

    load(files.ours, "cuda:0", pool=pool)  # resident in the pool
    with timer(t.setdefault("ours_dram_to_gpu", [])):
        _sync(load(files.ours, "cuda:0", pool=pool))
    load_file(files.safetensors)
    with timer(t.setdefault("safetensors_warm_to_gpu", [])):
        _sync(load_file(files.safetensors, device="cuda:0"))
    host = torch.empty(1024 * MB, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda:0")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    with timer(t.setdefault("pinned_h2d_1GiB", [])):
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
    torch.cuda.empty_cache()

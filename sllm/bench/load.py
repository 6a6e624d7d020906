"""`sllm bench load`: checkpoint loading, ours against the disk and the usual loaders.

One run generates an LLM-shaped checkpoint (bf16; attention and MLP
matrices, plus biases and norms so that over a third of the tensors are
under 1 MB), writes it as safetensors, as a torch.save file and in our
format, then measures in interleaved rounds, each cold read preceded by
dropping the files from the page cache (posix_fadvise DONTNEED), in an
order that rotates every round:

- fio: 4 MiB sequential O_DIRECT reads, libaio, queue depth 32, on our data
  file: the raw device bandwidth; also with one such job per CPU, each on its
  own slice of the file;
- ours cold: a load into the host pool (pre-mapped at start-up, as the
  invoker's is) until the CPU tensors are usable, every chunk CRC-checked;
  and ours into freshly mapped memory;
- safetensors.torch.load_file cold with every byte touched (a CRC pass over
  the tensors, the same work our verification does), also with only every
  page touched, and with its pread backend; torch.load cold;
- warm: ours from the host pool (a DRAM-tier hit: the tensors are views of
  memory that is already mapped and resident) against safetensors from the
  page cache with every page touched (its mmap'd tensors fault their pages
  in on first use); also ours with the same page touch, for the strict view;
- with CUDA: ours NVMe->GPU and DRAM->GPU, safetensors to the GPU, and the
  pinned host->device copy bandwidth.

Times are medians over the rounds; ratios are computed from the medians.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sllm.native_loader import HostPool, load, load_with_info, save_state_dict
from sllm.native_loader._engine import crc32c
from sllm.native_loader._read import DEFAULT_THREADS

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


def run(
    *,
    size_gb: float,
    rounds: int,
    workdir: Path,
    out: Path,
    threads: int | None,
    keep: bool,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Run the benchmark, print a table, write JSON to `out`; returns the results."""
    from safetensors.torch import load_file

    size_bytes = int(size_gb * 1e9)
    files = Files(workdir, size_bytes, echo)
    nbytes = sum(p.stat().st_size for p in files.ours_data)
    ntensors = len(load(files.ours, verify="never"))
    threads = threads or DEFAULT_THREADS
    pool = HostPool(int(nbytes * 1.5) + 64 * MB, threads=threads)
    pool.reserve([p.stat().st_size for p in files.ours_data])
    cuda = torch.cuda.is_available()
    t: dict[str, list[float]] = {}
    fio: list[float] = []
    fio_jobs: list[float] = []
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

    def ours_cold() -> None:
        cold("ours_cold", lambda: load(files.ours, pool=pool, threads=threads))
        pool.evict(files.ours)

    cold_steps: list[Callable[[], None]] = [
        fio_round,
        ours_cold,
        lambda: cold("ours_cold_fresh_memory", lambda: load(files.ours, threads=threads)),
        lambda: cold(
            "safetensors_cold_every_byte", lambda: touch_bytes(load_file(files.safetensors))
        ),
        lambda: cold(
            "safetensors_cold_every_page", lambda: touch_pages(load_file(files.safetensors))
        ),
        lambda: cold(
            "safetensors_pread_cold_every_byte",
            lambda: touch_bytes(load_file(files.safetensors, backend="pread")),
        ),
        lambda: cold("torch_load_cold", lambda: torch.load(files.torch, weights_only=True)),
    ]
    for r in range(rounds):
        echo(f"round {r + 1}/{rounds}")
        # Rotate the order every round: no method always follows the same reader of
        # the same file (a virtual disk may cache below the guest's page cache).
        for i in range(len(cold_steps)):
            cold_steps[(i + r) % len(cold_steps)]()
        # Warm: ours already in the pool; safetensors in the page cache (read it once first).
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
        if cuda:
            _cuda_round(files, pool, threads, t, cold)
        pool.evict(files.ours)

    results = _summarise(t, fio, fio_jobs, nbytes, ntensors, rounds, threads, size_bytes)
    _print_table(results, echo)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    echo(f"wrote {out}")
    if not keep:
        shutil.rmtree(files.dir, ignore_errors=True)
    return results


def _cuda_round(
    files: Files,
    pool: HostPool,
    threads: int,
    t: dict[str, list[float]],
    cold: Callable[[str, Callable[[], object]], None],
) -> None:
    from safetensors.torch import load_file

    def sync(x: object) -> object:
        torch.cuda.synchronize()
        return x

    pool.evict(files.ours)
    cold("ours_nvme_to_gpu", lambda: sync(load(files.ours, "cuda:0", pool=pool, threads=threads)))
    with timer(t.setdefault("ours_dram_to_gpu", [])):
        sync(load(files.ours, "cuda:0", pool=pool))
    cold("safetensors_cold_to_gpu", lambda: sync(load_file(files.safetensors, device="cuda:0")))
    load_file(files.safetensors)
    with timer(t.setdefault("safetensors_warm_to_gpu", [])):
        sync(load_file(files.safetensors, device="cuda:0"))
    host = torch.empty(1024 * MB, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda:0")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    with timer(t.setdefault("pinned_h2d_1GiB", [])):
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _summarise(
    t: dict[str, list[float]],
    fio: list[float],
    fio_jobs: list[float],
    nbytes: int,
    ntensors: int,
    rounds: int,
    threads: int,
    size_bytes: int,
) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in t.items()}
    gbps = {k: nbytes / v / 1e9 for k, v in med.items()}
    if "pinned_h2d_1GiB" in med:
        gbps["pinned_h2d_1GiB"] = 1024 * MB / med["pinned_h2d_1GiB"] / 1e9
    fio_med = statistics.median(fio) / 1e9 if fio else None
    fio_jobs_med = statistics.median(fio_jobs) / 1e9 if fio_jobs else None
    shapes = llm_shapes(size_bytes)
    small = sum(1 for _, s in shapes if math.prod(s) * 2 < 1e6)
    ratios: dict[str, float | None] = {
        "ours_cold_vs_fio": gbps["ours_cold"] / fio_med if fio_med else None,
        "ours_cold_fresh_memory_vs_fio": gbps["ours_cold_fresh_memory"] / fio_med
        if fio_med
        else None,
        "ours_cold_speedup_vs_safetensors_cold": med["safetensors_cold_every_byte"]
        / med["ours_cold"],
        "ours_cold_speedup_vs_safetensors_cold_every_page": med["safetensors_cold_every_page"]
        / med["ours_cold"],
        "ours_cold_speedup_vs_safetensors_pread_cold": med["safetensors_pread_cold_every_byte"]
        / med["ours_cold"],
        "ours_cold_speedup_vs_torch_load_cold": med["torch_load_cold"] / med["ours_cold"],
        "dram_hit_speedup_vs_safetensors_warm": med["safetensors_warm_page_cache"]
        / med["ours_dram_hit"],
        "dram_hit_every_page_speedup_vs_safetensors_warm": med["safetensors_warm_page_cache"]
        / med["ours_dram_hit_every_page"],
    }
    targets: dict[str, Any] = {
        "ours_cold_vs_fio >= 0.9": _meets(ratios["ours_cold_vs_fio"], 0.9),
        "ours_cold_speedup_vs_safetensors_cold >= 1.3": _meets(
            ratios["ours_cold_speedup_vs_safetensors_cold"], 1.3
        ),
        "dram_hit_speedup_vs_safetensors_warm >= 20": _meets(
            ratios["dram_hit_speedup_vs_safetensors_warm"], 20
        ),
    }
    if "ours_nvme_to_gpu" in med:
        ratios["ours_nvme_to_gpu_vs_fio"] = gbps["ours_nvme_to_gpu"] / fio_med if fio_med else None
        ratios["ours_nvme_to_gpu_speedup_vs_safetensors"] = (
            med["safetensors_cold_to_gpu"] / med["ours_nvme_to_gpu"]
        )
        targets["ours_dram_to_gpu >= 40 GB/s"] = gbps["ours_dram_to_gpu"] >= 40
        targets["ours_nvme_to_gpu_vs_fio >= 0.9"] = _meets(ratios["ours_nvme_to_gpu_vs_fio"], 0.9)
    return {
        "benchmark": "load",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "checkpoint": {
            "bytes": nbytes,
            "tensors": ntensors,
            "tensors_under_1MB": small,
            "dtype": "bf16",
        },
        "rounds": rounds,
        "reader_threads": threads,
        "fio_GBps": {"median": fio_med, "rounds": [b / 1e9 for b in fio]},
        "fio_one_job_per_cpu_GBps": {"median": fio_jobs_med, "rounds": [b / 1e9 for b in fio_jobs]},
        "seconds": {k: {"median": med[k], "rounds": v} for k, v in t.items()},
        "GBps": gbps,
        "ratios": ratios,
        "targets_met": targets,
    }


def _meets(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def _print_table(res: dict[str, Any], echo: Callable[[str], None]) -> None:
    ck = res["checkpoint"]
    echo(
        f"\ncheckpoint: {ck['bytes'] / 1e9:.2f} GB, {ck['tensors']} tensors "
        f"({ck['tensors_under_1MB']} under 1 MB), {res['rounds']} rounds, "
        f"{res['reader_threads']} reader threads"
    )
    fio = res["fio_GBps"]["median"]
    echo(f"{'measurement':42} {'median s':>10} {'GB/s':>8}")
    if fio:
        echo(f"{'fio (4 MiB, O_DIRECT, libaio, QD32)':42} {'':>10} {fio:8.2f}")
    fio_jobs = res["fio_one_job_per_cpu_GBps"]["median"]
    if fio_jobs:
        echo(f"{'fio, same, one job per CPU':42} {'':>10} {fio_jobs:8.2f}")
    for k, v in res["seconds"].items():
        echo(f"{k:42} {v['median']:10.4f} {res['GBps'][k]:8.2f}")
    echo("")
    for k, v in res["ratios"].items():
        echo(f"{k:52} {'n/a' if v is None else f'{v:.2f}'}")
    for k, v in res["targets_met"].items():
        echo(f"target {k:45} {'n/a' if v is None else ('met' if v else 'NOT met')}")

"""`sllm bench load`'s summary: which measurements the targets compare, ratios and the table.

Every target and ratio is the baseline's median time over ours, and each target pairs two
measurements that leave the same bytes touched in memory (`TOUCH`), so neither side is
credited for work it skipped.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import torch

MB = 1024 * 1024

# What each measurement leaves touched in memory: a target compares only equals.
# fio and every cold read put every byte in memory (ours also CRC-checks each one).
TOUCH = {
    "fio": "every byte",
    "ours_cold": "every byte",
    "ours_cold_reused_buffer": "every byte",
    "safetensors_cold_every_byte": "every byte",
    "safetensors_cold_every_page": "every page",
    "safetensors_pread_cold_every_byte": "every byte",
    "torch_load_cold": "every byte",
    "ours_dram_hit": "none after the call",
    "ours_dram_hit_every_page": "every page",
    "safetensors_warm_page_cache": "every page",
    "safetensors_warm_page_cache_untouched": "none after the call",
    "ours_nvme_to_gpu": "every byte",
    "safetensors_cold_to_gpu": "every byte",
    "ours_dram_to_gpu": "every byte",
    "safetensors_warm_to_gpu": "every byte",
}
# (ratio, ours, baseline, bound): the baseline's time over ours must reach the bound.
TARGETS = (
    ("ours_cold_vs_fio", "ours_cold", "fio", 0.9),
    ("ours_cold_speedup_vs_safetensors_cold", "ours_cold", "safetensors_cold_every_byte", 1.3),
    (
        "dram_hit_every_page_speedup_vs_safetensors_warm",
        "ours_dram_hit_every_page",
        "safetensors_warm_page_cache",
        20.0,
    ),
)
CUDA_TARGETS = (("ours_nvme_to_gpu_vs_fio", "ours_nvme_to_gpu", "fio", 0.9),)
# Context, not targets.
RATIOS = (
    ("ours_cold_reused_buffer_vs_fio", "ours_cold_reused_buffer", "fio"),
    (
        "ours_cold_speedup_vs_safetensors_cold_every_page",
        "ours_cold",
        "safetensors_cold_every_page",
    ),
    (
        "ours_cold_speedup_vs_safetensors_pread_cold",
        "ours_cold",
        "safetensors_pread_cold_every_byte",
    ),
    ("ours_cold_speedup_vs_torch_load_cold", "ours_cold", "torch_load_cold"),
    (
        "dram_hit_untouched_speedup_vs_safetensors_warm_untouched",
        "ours_dram_hit",
        "safetensors_warm_page_cache_untouched",
    ),
)
CUDA_RATIOS = (
    ("ours_nvme_to_gpu_speedup_vs_safetensors", "ours_nvme_to_gpu", "safetensors_cold_to_gpu"),
)


def summarise(
    t: dict[str, list[float]],
    fio: list[float],
    fio_jobs: list[float],
    nbytes: int,
    ntensors: int,
    rounds: int,
    threads: int,
    shapes: list[tuple[str, tuple[int, ...]]],
) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in t.items()}
    gbps = {k: nbytes / v / 1e9 for k, v in med.items()}
    if "pinned_h2d_1GiB" in med:
        gbps["pinned_h2d_1GiB"] = 1024 * MB / med["pinned_h2d_1GiB"] / 1e9
    fio_med = statistics.median(fio) / 1e9 if fio else None
    fio_jobs_med = statistics.median(fio_jobs) / 1e9 if fio_jobs else None
    # fio as a time, so every ratio is the baseline's time over ours.
    times: dict[str, float] = {**med, **({"fio": nbytes / (fio_med * 1e9)} if fio_med else {})}
    small = sum(1 for _, s in shapes if math.prod(s) * 2 < 1e6)
    cuda = "ours_nvme_to_gpu" in med
    ratios: dict[str, float | None] = {}
    targets: dict[str, Any] = {}
    for name, ours, base, bound in TARGETS + (CUDA_TARGETS if cuda else ()):
        ratios[name] = _ratio(times, base, ours)
        targets[f"{name} >= {bound:g}"] = _meets(ratios[name], bound)
    for name, ours, base in RATIOS + (CUDA_RATIOS if cuda else ()):
        ratios[name] = _ratio(times, base, ours)
    if cuda:
        targets["ours_dram_to_gpu >= 40 GB/s"] = gbps["ours_dram_to_gpu"] >= 40
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
        "touched": {k: v for k, v in TOUCH.items() if k in times},
        "ratios": ratios,
        "target_pairs": {
            name: {"ours": ours, "baseline": base, "bound": bound}
            for name, ours, base, bound in TARGETS + (CUDA_TARGETS if cuda else ())
        },
        "targets_met": targets,
    }


def _ratio(times: Mapping[str, float], numerator: str, denominator: str) -> float | None:
    if numerator not in times or denominator not in times:
        return None
    return times[numerator] / times[denominator]


def _meets(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def print_table(res: dict[str, Any], echo: Callable[[str], None]) -> None:
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

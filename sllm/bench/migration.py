"""`sllm bench migration`: the pause a client sees when its generation moves, against the naive ways.

One run builds a random-weight float32 Llama (about `--size-mb`, context `--context`
tokens, no end-of-sequence token, so every output runs to its length), publishes it to a
local folder store and starts, on loopback, two controller processes on one SQLite
database (one with the default round policy, one with SLLM_MIGRATION_MAX_ROUNDS=0) and
two invoker processes (see _migration_stack). The function is greedy, resumes on invoker
loss, and keeps a warm instance on each invoker (min_instances 2), so a destination never
loads: every variant starts from both instances warm and idle.

For each prompt length (`--prompt-lens`, random token ids) and in each of `--rounds`
rounds, the five measurements of _migration_runs run one after another, in an order
rotated round by round; the migration, abort or kill comes at token `--at` of an
`--output-len`-token output:

    baseline             TPOT (the median inter-token gap) and total time, unmoved
    live                 the pause after the migrate request, rounds, tokens recomputed,
                         switch and total migration time
    stop_and_recompute   the same with no live rounds: pause S, prefill all on D, go on
    preempt_and_restart  abort, rerun from the prompt: the pause and the extra time to finish
    resume_after_kill    SIGKILL of the serving invoker: the gap, and detection + load +
                         prefill (each measured on its own)

Medians over rounds, ratios and the issue's targets (met / not met) go to `--out` with the
commit: live pause <= 3x TPOT at every length, stop-and-recompute's pause increasing with
the prompt, resume gap <= 1.5x its parts with detection < 1 s; and whether the model's
decode step (the baseline's TPOT) was >= 10 ms, the issue's condition.

`--quick` is a smoke run: a model of about 10 MB, prompts of 16 and 64 tokens, one round.
Caveat: both invokers, both controllers and the client share the host's CPUs; each
invoker gets `--torch-threads` (default half the CPUs), so a destination's prefill
competes with the source's decoding only where the host has fewer cores than that.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ._decode_workload import prompt_tokens, rotation
from ._migration_runs import VARIANTS, Runner
from ._migration_stats import over_rounds, ratios, step_condition, targets
from ._results import write_results

if TYPE_CHECKING:
    from ._migration_stack import Cluster

Echo = Callable[[str], None]
MODEL = "bench-migration"


@dataclass(frozen=True)
class Settings:
    """What one run measures; `QUICK` is the smoke run's."""

    size_mb: int = 66  # 18 layers; 12 layers measured a 7.9 ms step here, so about 12 ms
    rounds: int = 3
    prompt_lens: tuple[int, ...] = (128, 1024, 4096)
    output_len: int = 512
    at: int = 16
    context: int = 4608
    torch_threads: int = max(1, (os.cpu_count() or 2) // 2)
    seed: int = 0


QUICK = Settings(size_mb=10, rounds=1, prompt_lens=(16, 64), output_len=300, at=8, context=384)


def check(settings: Settings) -> None:
    """click.BadParameter when the lengths do not fit the context or the output."""
    longest = max(settings.prompt_lens) + settings.output_len
    if longest > settings.context:
        raise click.BadParameter(
            f"the longest prompt ({max(settings.prompt_lens)}) + --output-len "
            f"({settings.output_len}) is {longest} tokens, past --context {settings.context}"
        )
    if not 1 <= settings.at < settings.output_len:
        raise click.BadParameter(f"--at must be in [1, {settings.output_len - 1}]")


def run(settings: Settings, *, workdir: Path, out: Path, keep: bool, echo: Echo) -> dict[str, Any]:
    """Run the benchmark, print a table, write JSON to `out`; returns the results."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sllm.store import open_store, push_model

    from ._coldstart_model import build_model, shape_for
    from ._migration_stack import Cluster

    check(settings)
    hf_logging.disable_progress_bar()
    began, load_before = time.monotonic(), os.getloadavg()[0]
    base = workdir / f"migration-{settings.size_mb}MB-ctx{settings.context}"
    hf = build_model(
        base / "hf", settings.size_mb * 1_000_000, echo, eos=False, context=settings.context
    )
    scratch = base / f"run-{os.getpid()}"
    store_uri = (scratch / "store").resolve().as_uri()
    echo(f"publishing to {store_uri} ...")
    push_model(str(hf), MODEL, open_store(store_uri), progress=False)
    cluster = Cluster(
        store_uri=store_uri,
        workdir=scratch,
        model=MODEL,
        torch_threads=settings.torch_threads,
        output_len=settings.output_len,
    )
    vocab = len(AutoTokenizer.from_pretrained(hf))  # the ids a request may carry
    try:
        echo("starting 2 controllers (live, stop-and-recompute) and 2 invokers ...")
        cluster.start()
        echo("both instances warm")
        runs, orders = _measure(settings, cluster, vocab, echo)
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(f"{exc}\n{cluster.logs()}") from exc
    finally:
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    summary = {
        str(n): {variant: over_rounds(rows) for variant, rows in by_variant.items()}
        for n, by_variant in runs.items()
    }
    shape = shape_for(settings.size_mb * 1_000_000)
    results: dict[str, Any] = {
        "benchmark": "migration",
        "machine": _machine(load_before),
        "model": {
            "architecture": "LlamaForCausalLM, random weights, no eos token",
            "dtype": "float32",
            "shape": asdict(shape),
            "parameters": shape.params,
            "context": settings.context,
        },
        "settings": {
            **asdict(settings),
            "request": "native stream (POST .../invocations?stream=true), prompt as token ids, "
            "temperature 0, max_tokens = output_len",
            "live_policy": "threshold 4 tokens, at most 4 rounds (the controller's defaults)",
            "stop_and_recompute": "a second controller on the same database with "
            "SLLM_MIGRATION_MAX_ROUNDS=0",
        },
        "definitions": {
            "tpot_s": "median gap between consecutive tokens at the client",
            "pause_s": "largest gap between consecutive tokens after the migrate request "
            "(live, stop-and-recompute); abort to the rerun's next new token (preempt)",
            "gap_s": "largest gap between consecutive tokens after the kill",
            "detection_s": "the kill (wall clock) to the controller's log line of the loss",
            "load_s": "the destination's load before it resumed (0: warm instance)",
            "prefill_s": "the destination invoker's TTFT of a request as long as the resumed "
            "sequence (prompt + tokens relayed), max_tokens 1, on its warm instance",
            "resume_ttft_s": "the resumed stream's own TTFT on the destination (request "
            "received to first token), from its invoker's TTFT histogram",
            "parts_s": "detection_s + load_s + prefill_s",
            "finish_s": "preempt: the first send to the rerun's last token",
        },
        "rounds": settings.rounds,
        "orders": orders,
        "outputs_match": True,  # a mismatch raises before this
        "condition_decode_step": step_condition(summary),
        "summary": summary,
        "ratios": ratios(summary),
        "targets": targets(summary),
        "wall_s": time.monotonic() - began,
    }
    results["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    print_table(results, echo)
    write_results(out, _finite(results), echo)
    return results


def _measure(
    settings: Settings, cluster: Cluster, vocab: int, echo: Echo
) -> tuple[dict[int, dict[str, list[dict[str, Any]]]], list[list[str]]]:
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {n: {} for n in settings.prompt_lens}
    orders: list[list[str]] = []
    for r in range(settings.rounds):
        order = rotation(VARIANTS, r)
        orders.append(order)
        for n in settings.prompt_lens:
            echo(f"round {r + 1}/{settings.rounds}, prompt {n} tokens")
            runner = Runner(
                cluster,
                prompt_tokens(n, seed=settings.seed * 7919 + n, vocab=vocab),
                settings.output_len,
                settings.at,
                prompt_tokens(n + settings.output_len, seed=settings.seed * 7919 + 1, vocab=vocab),
            )
            for variant in order:
                row = runner.run(variant)
                runs[n].setdefault(variant, []).append(row)
                echo(f"  {variant:20} {_line(row)}")
            runner.check_outputs()
    return runs, orders


def _line(row: dict[str, Any]) -> str:
    shown = []
    for key, value in row.items():
        if isinstance(value, float) and key.endswith("_s"):
            shown.append(f"{key[:-2]} {value * 1000:.1f} ms")
        elif not isinstance(value, float):
            shown.append(f"{key} {value}")
    return ", ".join(shown)


def _machine(load_before: float) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loadavg_1min_start": load_before,
    }


def _finite(doc: Any) -> Any:
    """`doc` with nan / inf floats as None (strict JSON)."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [_finite(v) for v in doc]
    return doc


def print_table(res: dict[str, Any], echo: Echo) -> None:
    """Medians per prompt length, then the condition on the model and the targets."""
    columns = [
        ("TPOT", "baseline", "tpot_s"),
        ("live", "live", "pause_s"),
        ("stop+rc", "stop_and_recompute", "pause_s"),
        ("preempt", "preempt_and_restart", "pause_s"),
        ("resume", "resume_after_kill", "gap_s"),
        ("detect", "resume_after_kill", "detection_s"),
        ("load", "resume_after_kill", "load_s"),
        ("prefill", "resume_after_kill", "prefill_s"),
        ("res.TTFT", "resume_after_kill", "resume_ttft_s"),
    ]
    echo(f"\n{res['rounds']} round(s), medians in ms (pauses, gaps and their parts)")
    echo(f"{'prompt':>6} " + " ".join(f"{c[0]:>8}" for c in columns) + f" {'rounds':>6}")
    for length, by_variant in res["summary"].items():
        cells = []
        for _, variant, metric in columns:
            value = by_variant.get(variant, {}).get(metric, {}).get("median")
            ok = isinstance(value, float) and math.isfinite(value)
            cells.append(f"{value * 1000:8.1f}" if ok else f"{'-':>8}")
        rounds = by_variant.get("live", {}).get("rounds", {}).get("median", "-")
        echo(f"{length:>6} " + " ".join(cells) + f" {rounds:>6}")
    cond = res["condition_decode_step"]
    echo(f"\ndecode step >= {cond['bound_ms']:g} ms at every length: {cond['held']}")
    for name, t in res["targets"].items():
        if t["met"] is None:
            echo(f"{name:74} not measured")
            continue
        echo(
            f"{name:74} {t['value']:7.2f}  target {t['target']:16} {'met' if t['met'] else 'NOT met'}"
        )


def _ints(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        parsed = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not parsed or min(parsed) < 1:
        raise click.BadParameter(f"expected integers >= 1, got {value!r}")
    return tuple(sorted(set(parsed)))


@click.command("migration")
@click.option("--quick", is_flag=True, help="Smoke run: ~10 MB model, prompts 16,64, 1 round.")
@click.option("--rounds", type=click.IntRange(min=1), help="Rotated rounds [3].")
@click.option("--size-mb", type=click.IntRange(min=1), help="Model size, float32 [66].")
@click.option("--prompt-lens", callback=_ints, help="Prompt lengths in tokens [128,1024,4096].")
@click.option("--output-len", type=click.IntRange(min=2), help="Output tokens per request [512].")
@click.option("--at", type=click.IntRange(min=1), help="Token at which to move/abort/kill [16].")
@click.option("--context", type=click.IntRange(min=2), help="The model's context [4608].")
@click.option("--torch-threads", type=click.IntRange(min=1), help="Per invoker [CPUs / 2].")
@click.option("--seed", type=int, help="Seed of the prompts [0].")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("benchmarks/scratch"),
    show_default=True,
    help="Where the model, the store, the database and the logs live.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("benchmarks/results/migration.json"),
    show_default=True,
    help="JSON results file.",
)
@click.option("--keep", is_flag=True, help="Keep the built model for the next run.")
def command(quick: bool, workdir: Path, out: Path, keep: bool, **options: Any) -> None:
    """Live migration's pause against stop-and-recompute, preemption and resume after kill."""
    settings = QUICK if quick else Settings()
    settings = replace(settings, **{k: v for k, v in options.items() if v is not None})
    check(settings)
    run(settings, workdir=workdir, out=out, keep=keep, echo=click.echo)


if __name__ == "__main__":
    command()

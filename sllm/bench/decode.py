"""`sllm bench decode`: tokens per second of concurrent streams, served against `generate`.

One run builds a random-weight float32 Llama (about `--size-mb`, no
end-of-sequence token, so every output runs to its length), publishes it to
a local folder store and starts two invoker processes on loopback serving it
through /v1/invoke (prompts sent as token ids, greedy):

    batching         `sllm invoker start --batching`: an instance's streams advance
                     together, one batched forward pass per step
    no_batching      `--no-batching`: today's runtime, one stream's step at a time
    static_generate  `model.generate` in this process on a static batch of the same
                     requests (same model, greedy), prompts left-padded to the longest

Scenarios, each measured in every round:

    same_lengths  1, 4, 8, 16 streams (`--streams`) of `--prompt-len` random prompt
                  tokens and `--output-len` output tokens, all sent at once
    mixed         8 and 16 requests (`--mixed`) with lengths drawn (seeded) from the
                  ShareGPT trace, scaled to `--context` tokens (see _decode_workload),
                  all sent at once; static generate runs to the longest output and
                  counts each request's own length (useful tokens)
    staggered     `--staggered-requests` trace requests arriving as a Poisson process
                  at 3 rates, fractions (`--rate-fractions`) of the saturation rate:
                  requests / wall time of the largest mixed set on the batching
                  invoker, measured once during the warm-up

Per run: aggregate tokens/s, TTFT, per-stream TPOT and inter-token gaps
(see _decode_stats). Rounds are interleaved: in round r the systems of each
measurement start from the r-th in turn. Medians over rounds, their ratios,
and the issue's targets (met / not met) go to `--out` with the commit:
aggregate at 8 and 16 same-length streams >= 0.9x static generate; mixed
>= 1.3x static generate; one stream >= 0.95x the no-batching invoker; TPOT
p99 at the middle staggered rate <= 2x the single-stream TPOT.

`--quick` is a smoke run: a model of about 10 MB, short lengths, one round.
Caveat: the client, both invokers and the baseline share the host's CPUs;
only the system being measured is busy at a time.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click

from ._decode_stats import over_rounds, run_stats, targets
from ._decode_workload import (
    Request,
    draw_requests,
    find_trace,
    poisson_arrivals,
    prompt_tokens,
    rates_from_saturation,
    read_lengths,
    rotation,
)
from ._results import write_results

Echo = Callable[[str], None]
MODEL = "bench-decode"
PAD = 3  # the benchmark tokenizer's <pad>
RATE_NAMES = ("low", "middle", "high")
_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Settings:
    """What one run measures; `QUICK` is the smoke run's."""

    size_mb: int = 400
    rounds: int = 3
    streams: tuple[int, ...] = (1, 4, 8, 16)
    prompt_len: int = 64
    output_len: int = 64
    mixed: tuple[int, ...] = (8, 16)
    context: int = 1024
    staggered_requests: int = 32
    rate_fractions: tuple[float, float, float] = (0.25, 0.5, 1.0)
    seed: int = 0
    device: str = "cpu"


QUICK = Settings(
    size_mb=10,
    rounds=1,
    streams=(1, 4, 8, 16),
    prompt_len=8,
    output_len=6,
    mixed=(8, 16),
    context=48,
    staggered_requests=8,
)


@dataclass
class _Workload:
    same: dict[int, list[list[int]]]
    mixed: dict[int, list[Request]]
    mixed_prompts: dict[int, list[list[int]]]
    staggered: list[Request]
    staggered_prompts: list[list[int]]


def run(
    settings: Settings, *, workdir: Path, out: Path, trace: Path | None, keep: bool, echo: Echo
) -> dict[str, Any]:
    """Run the benchmark, print a table, write JSON to `out`; returns the results."""
    from transformers.utils import logging as hf_logging

    from sllm.store import open_store, push_model

    from ._coldstart_model import build_model
    from ._decode_serving import InvokerServer

    hf_logging.disable_progress_bar()
    trace = trace or find_trace(_REPO)
    if trace is None:
        raise click.ClickException(
            "the ShareGPT lengths file was not found in ../shared/data/traces; give --trace"
        )
    load_before = os.getloadavg()[0]
    base = workdir / f"decode-{settings.size_mb}MB"
    hf = build_model(base / "hf", settings.size_mb * 1_000_000, echo, eos=False)
    scratch = base / f"run-{os.getpid()}"
    store_uri = f"file://{(scratch / 'store').resolve()}"
    echo(f"publishing to {store_uri} ...")
    push_model(str(hf), MODEL, open_store(store_uri), progress=False)
    servers = {
        name: InvokerServer(
            name, batching=name == "batching", store_uri=store_uri, workdir=scratch, device=dev
        )
        for name, dev in (("batching", settings.device), ("no_batching", settings.device))
    }
    try:
        for s in servers.values():
            s.launch()
        for s in servers.values():
            s.wait_ready()
        echo("invokers ready (batching on and off)")
        results = _measure(settings, hf, trace, servers, echo)
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    results["machine"]["loadavg_1min"] = {"start": load_before, "end": os.getloadavg()[0]}
    print_table(results, echo)
    write_results(out, _finite(results), echo)
    return results


def _workload(settings: Settings, trace: Path, vocab: int) -> _Workload:
    pairs = read_lengths(trace)
    seed = settings.seed
    same = {
        n: [prompt_tokens(settings.prompt_len, seed=seed * 7919 + i, vocab=vocab) for i in range(n)]
        for n in settings.streams
    }
    mixed = {
        n: draw_requests(pairs, n, context=settings.context, seed=seed + n) for n in settings.mixed
    }
    mixed_prompts = {
        n: [
            prompt_tokens(r.prompt_len, seed=seed * 7919 + 1000 * n + i, vocab=vocab)
            for i, r in enumerate(reqs)
        ]
        for n, reqs in mixed.items()
    }
    staggered = draw_requests(
        pairs, settings.staggered_requests, context=settings.context, seed=seed + 1
    )
    staggered_prompts = [
        prompt_tokens(r.prompt_len, seed=seed * 7919 + 100_000 + i, vocab=vocab)
        for i, r in enumerate(staggered)
    ]
    return _Workload(same, mixed, mixed_prompts, staggered, staggered_prompts)


def _measure(
    settings: Settings, hf: Path, trace: Path, servers: dict[str, Any], echo: Echo
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ._decode_serving import stream_requests
    from ._decode_static import static_generate

    device = torch.device("cuda" if settings.device == "auto" else settings.device)
    if settings.device == "auto" and not torch.cuda.is_available():
        device = torch.device("cpu")
    model: Any = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    model = model.to(device).eval()
    vocab = len(AutoTokenizer.from_pretrained(hf))
    work = _workload(settings, trace, vocab)

    def serve(
        system: str, prompts: Sequence[list[int]], lens: Sequence[int], at: Sequence[float] | None
    ) -> tuple[dict[str, float], list[list[int]]]:
        if system == "static_generate":
            times, end, tokens = static_generate(model, prompts, lens, PAD)
            return run_stats(times, end=end), tokens
        times, tokens = stream_requests(servers[system], MODEL, prompts, lens, at)
        return run_stats(times), tokens

    # Warm-up (untimed): loads the instances, and the saturation rate for the staggered runs.
    echo("warm-up: one request per system, then the largest mixed set on the batching invoker")
    first = work.same[settings.streams[0]][:1]
    warm = {
        s: serve(s, first, [settings.output_len], None)[1][0] for s in (*servers, "static_generate")
    }
    big = max(settings.mixed)
    sat_stats, _ = serve(
        "batching", work.mixed_prompts[big], [r.output_len for r in work.mixed[big]], None
    )
    saturation_rps = big / sat_stats["wall_s"]
    rates = rates_from_saturation(saturation_rps, settings.rate_fractions)
    echo(
        f"saturation: {big} mixed requests in {sat_stats['wall_s']:.2f} s = "
        f"{saturation_rps:.3f} requests/s; staggered rates " + ", ".join(f"{r:.3f}" for r in rates)
    )
    runs: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {
        "same_lengths": {},
        "mixed": {},
        "staggered": {},
    }
    agreement: dict[str, dict[str, float]] = {}
    orders: list[dict[str, list[str]]] = []
    systems = ("batching", "no_batching", "static_generate")
    for r in range(settings.rounds):
        echo(f"round {r + 1}/{settings.rounds}")
        orders.append({"three": rotation(systems, r), "two": rotation(systems[:2], r)})
        for n in settings.streams:
            outputs: dict[str, list[list[int]]] = {}
            for system in rotation(systems, r):
                stats, outputs[system] = serve(
                    system, work.same[n], [settings.output_len] * n, None
                )
                _record(runs, "same_lengths", str(n), system, stats, echo)
            if r == 0:
                agreement[f"same_lengths/{n}"] = _agreement(outputs)
        for n in settings.mixed:
            lens = [q.output_len for q in work.mixed[n]]
            mixed_systems = ("batching", "static_generate")
            for system in rotation(mixed_systems, r):
                stats, _ = serve(system, work.mixed_prompts[n], lens, None)
                _record(runs, "mixed", str(n), system, stats, echo)
        lens = [q.output_len for q in work.staggered]
        for k, (name, rate) in enumerate(zip(RATE_NAMES, rates, strict=True)):
            arrivals = poisson_arrivals(len(lens), rate, seed=settings.seed + k)
            for system in rotation(systems[:2], r):
                stats, _ = serve(system, work.staggered_prompts, lens, arrivals)
                _record(runs, "staggered", name, system, stats, echo)
    summary = {
        scenario: {
            size: {system: over_rounds(rs) for system, rs in by_system.items()}
            for size, by_system in by_size.items()
        }
        for scenario, by_size in runs.items()
    }
    ratios = _ratios(summary)
    return {
        "benchmark": "decode",
        "machine": _machine(device),
        "model": _model_info(hf, settings.size_mb),
        "settings": {
            **asdict(settings),
            "trace": str(trace),
            "request": "POST /v1/invoke, stream, tokens as ids, temperature 0, max_tokens = length",
            "static_generate": "model.generate in-process, greedy, left-padded, "
            "max_new_tokens = the longest output of the batch",
        },
        "definitions": {
            "tokens_per_s": "output tokens of all streams / (last token - first send); "
            "static generate: useful tokens (each request's own length) / generate's wall time",
            "ttft": "first token - send, per stream",
            "tpot": "(last token - first token) / (tokens - 1), per stream; p50/p99 over streams",
            "itl": "gaps between consecutive tokens of a stream, all streams",
        },
        "workload": {
            "same_lengths": {"prompt_len": settings.prompt_len, "output_len": settings.output_len},
            "mixed": {
                str(n): [[q.prompt_len, q.output_len] for q in v] for n, v in work.mixed.items()
            },
            "staggered": [[q.prompt_len, q.output_len] for q in work.staggered],
            "saturation_rps": saturation_rps,
            "saturation_wall_s": sat_stats["wall_s"],
            "rates_rps": dict(zip(RATE_NAMES, rates, strict=True)),
        },
        "rounds": settings.rounds,
        "orders": orders,
        "warmup_outputs_match": all(v == warm["no_batching"] for v in warm.values()),
        "greedy_agreement_with_no_batching": agreement,
        **summary,
        "ratios": ratios,
        "targets": targets(summary),
    }


def _record(
    runs: dict[str, dict[str, dict[str, list[dict[str, float]]]]],
    scenario: str,
    size: str,
    system: str,
    stats: dict[str, float],
    echo: Echo,
) -> None:
    runs[scenario].setdefault(size, {}).setdefault(system, []).append(stats)
    echo(
        f"  {scenario:12} {size:>6} {system:16} {stats['tokens_per_s']:8.1f} tok/s  "
        f"TTFT p50 {stats['ttft_p50_s'] * 1e3:8.1f} ms  "
        f"TPOT p50/p99 {stats['tpot_p50_s'] * 1e3:7.1f}/{stats['tpot_p99_s'] * 1e3:7.1f} ms"
    )


def _agreement(outputs: dict[str, list[list[int]]]) -> dict[str, float]:
    """Per system: the share of streams whose greedy tokens equal the no-batching invoker's."""
    ref = outputs.get("no_batching")
    if ref is None:
        return {}
    return {
        system: sum(a == b for a, b in zip(out, ref, strict=True)) / len(ref)
        for system, out in outputs.items()
    }


def _ratios(summary: dict[str, Any]) -> dict[str, float]:
    """Median tokens/s of the batching invoker over each other system, per scenario and size."""
    out: dict[str, float] = {}
    for scenario in ("same_lengths", "mixed"):
        for size, by_system in summary.get(scenario, {}).items():
            ours = by_system.get("batching", {}).get("tokens_per_s", {}).get("median")
            for system, stats in by_system.items():
                theirs = stats["tokens_per_s"]["median"]
                if system != "batching" and ours is not None and theirs > 0:
                    out[f"{scenario}/{size}: batching / {system}"] = ours / theirs
    return out


def _machine(device: Any) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _model_info(hf: Path, size_mb: int) -> dict[str, Any]:
    from ._coldstart_model import shape_for

    shape = shape_for(size_mb * 1_000_000)
    return {
        "architecture": "LlamaForCausalLM, random weights, no eos token",
        "dtype": "float32",
        "shape": asdict(shape),
        "parameters": shape.params,
        "safetensors_bytes": sum(p.stat().st_size for p in hf.glob("*.safetensors")),
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
    """Medians per scenario and system, then the targets."""
    m = res["model"]
    echo(
        f"\nmodel: {m['safetensors_bytes'] / 1e6:.0f} MB float32 Llama, "
        f"{res['rounds']} rounds, medians"
    )
    echo(f"{'scenario':26} {'system':16} {'tok/s':>8} {'TTFT p50':>9} {'TPOT p50':>9} {'p99':>8}")
    for scenario in ("same_lengths", "mixed", "staggered"):
        for size, by_system in res.get(scenario, {}).items():
            for system, stats in by_system.items():
                med = {k: v["median"] for k, v in stats.items()}
                echo(
                    f"{scenario + ' ' + size:26} {system:16} {med['tokens_per_s']:8.1f} "
                    f"{med['ttft_p50_s'] * 1e3:7.1f}ms {med['tpot_p50_s'] * 1e3:7.1f}ms "
                    f"{med['tpot_p99_s'] * 1e3:6.1f}ms"
                )
    echo("")
    for name, t in res["targets"].items():
        if t["met"] is None:
            echo(f"{name:70} not measured")
            continue
        state = "met" if t["met"] else "NOT met"
        echo(f"{name:70} {t['value']:6.2f}  target {t['target']:6}  {state}")


def _ints(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        parsed = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not parsed or min(parsed) < 1:
        raise click.BadParameter(f"expected integers >= 1, got {value!r}")
    return parsed


def _fractions(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        parsed = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected 3 comma-separated numbers, got {value!r}") from None
    if len(parsed) != 3 or not all(0 < f <= 10 for f in parsed):
        raise click.BadParameter(f"expected 3 fractions in (0, 10], got {value!r}")
    return parsed


@click.command("decode")
@click.option("--quick", is_flag=True, help="Smoke run: ~10 MB model, short lengths, 1 round.")
@click.option("--rounds", type=click.IntRange(min=1), help="Interleaved rounds [3].")
@click.option("--size-mb", type=click.IntRange(min=1), help="Model size, float32 [400].")
@click.option("--streams", callback=_ints, help="Same-length stream counts [1,4,8,16].")
@click.option("--prompt-len", type=click.IntRange(min=1), help="Same-length prompt tokens [64].")
@click.option("--output-len", type=click.IntRange(min=1), help="Same-length output tokens [64].")
@click.option("--mixed", callback=_ints, help="Mixed-length request counts [8,16].")
@click.option(
    "--context", type=click.IntRange(min=2), help="Trace lengths scaled to fit this [1024]."
)
@click.option(
    "--staggered-requests", type=click.IntRange(min=2), help="Poisson-arrival requests [32]."
)
@click.option("--rate-fractions", callback=_fractions, help="3 rates / saturation [0.25,0.5,1].")
@click.option("--seed", type=int, help="Seed of prompts, lengths and arrivals [0].")
@click.option("--device", help="cpu, cuda or auto, for the invokers and the baseline [cpu].")
@click.option(
    "--trace",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="ShareGPT lengths CSV [../shared/data/traces/sharegpt_lengths_llama2_tokenizer.csv].",
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("benchmarks/scratch"),
    show_default=True,
    help="Where the model, the store and the invokers' caches live.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("benchmarks/results/decode.json"),
    show_default=True,
    help="JSON results file.",
)
@click.option("--keep", is_flag=True, help="Keep the built model for the next run.")
def command(
    quick: bool, trace: Path | None, workdir: Path, out: Path, keep: bool, **options: Any
) -> None:
    """Decode throughput: concurrent streams, batching on/off, against static generate."""
    settings = QUICK if quick else Settings()
    given = {k: v for k, v in options.items() if v is not None}
    settings = replace(settings, **given)
    run(settings, workdir=workdir, out=out, trace=trace, keep=keep, echo=click.echo)


if __name__ == "__main__":
    command()

"""`sllm bench overhead`: what the controller adds to a warm invocation, alone and under load.

One run builds a tiny random Llama, publishes it to a local folder store and,
per database (SQLite file, and a fresh PostgreSQL database when reachable),
starts the system as real processes on loopback: `sllm controller start`
(gunicorn workers, `--workers`) and one `sllm invoker start` registered with
it. It creates namespace `bench`, a key and function `tiny` (concurrency 64,
one instance), and warms the instance up through both paths:

    controller   POST /api/v1/namespaces/bench/functions/tiny/invocations
                 ?blocking=true&result=true  (the public API, with the namespace's key)
    direct       POST {invoker}/v1/invoke with the body the controller sends
                 (same function id, so the same warm instance), internal token

The request is "hello", max_tokens 1, temperature 0.

Latency, one client: `--requests` pairs, one request per path back to back
(order alternating), each path over its own keep-alive httpx client.

    controller_e2e       wall time of the controller request at the client
    direct_e2e           wall time of the direct request at the client
    runtime              the direct request's `timing.total_s`: the invoker's own
                         time from receipt to done (tokenize, prefill, sample)
    overhead_vs_runtime  controller_e2e - runtime of the same pair: everything the
                         system adds around the runtime (client and server HTTP,
                         controller, the controller -> invoker hop, invoker HTTP).
                         The issue's "overhead"; its targets use the per-pair p50/p99.
    overhead_vs_direct   controller_e2e - direct_e2e: what going through the
                         controller adds over calling the invoker yourself
    direct_vs_runtime    direct_e2e - runtime: the invoker's own HTTP cost

Each difference is given per pair (then percentiles: `paired`) and as the
difference of the two series' p50 and p99. `controller_breakdown` splits the
controller requests using their activation records (read after the timing)
and the controller's own request-latency histogram (/metrics).

Throughput: closed loop at each `--clients` count (threads, one keep-alive
client each, next request when the last one answered), `--warmup` s untimed
then `--duration` s counted; first direct, then through the controller,
`--rounds` times; medians of the rates and their ratio. Any non-200 or
exception is an error. CPU cores used by the load generator, the controller's
and the invoker's process groups, and the whole host are recorded per run:
on a small host all of them share the same CPUs.

Targets (the issue's "done when"): overhead p50 <= 5 ms and p99 <= 15 ms at
one client; at 16 clients the controller path sustains >= 0.8 of the direct
rate with zero errors.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from ._overhead_stack import (
    CONCURRENCY,
    CONTROLLER_BODY,
    DIRECT_BODY,
    FUNCTION_DEF,
    INVOCATION_PATH,
    Stack,
    hide_password,
    postgres_database,
    postgres_unreachable,
)
from ._overhead_stats import (
    LatencySamples,
    LoadRun,
    all_met,
    summary_ms,
    targets,
    throughput_point,
)
from ._results import code_version, write_results

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
WARMUP_REQUESTS = 20  # per path, before the latency pairs
Echo = Callable[[str], None]


def run(
    *,
    requests: int,
    duration: float,
    warmup: float,
    rounds: int,
    clients: list[int],
    database: str,
    workers: int,
    invoker_threads: int,
    device: str,
    postgres_url: str,
    workdir: Path,
    out: Path,
    keep: bool,
    echo: Echo,
) -> dict[str, Any]:
    """Run the benchmark on each database, print a table, write JSON to `out`; return it."""
    import torch

    load_start = os.getloadavg()
    scratch = workdir / f"run-{uuid.uuid4().hex[:8]}"
    databases: dict[str, Any] = {}
    try:
        store_uri = _publish_model(scratch, echo)
        for name in ("sqlite", "postgres") if database == "both" else (database,):
            if name == "postgres":
                reason = postgres_unreachable(postgres_url)
                if reason is not None:
                    if database == "postgres":
                        raise click.ClickException(
                            f"PostgreSQL at {hide_password(postgres_url)} is unreachable: {reason}"
                        )
                    echo(f"postgres: skipped ({reason})")
                    databases[name] = {"skipped": f"unreachable: {reason}"}
                    continue
            try:
                with _database(name, scratch, postgres_url) as url:
                    echo(f"{name}: starting controller ({workers} workers) and invoker ...")
                    databases[name] = _measure_database(
                        url,
                        store_uri=store_uri,
                        workdir=scratch / name,
                        requests=requests,
                        duration=duration,
                        warmup=warmup,
                        rounds=rounds,
                        clients=clients,
                        workers=workers,
                        invoker_threads=invoker_threads,
                        device=device,
                        echo=echo,
                    )
            except (RuntimeError, OSError, SQLAlchemyError) as exc:
                # Recorded, so the other database's numbers still land in the JSON.
                echo(f"{name}: FAILED: {exc}")
                databases[name] = {"failed": str(exc)}
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    settings = {
        "requests": requests,
        "duration_s": duration,
        "warmup_s": warmup,
        "rounds": rounds,
        "clients": clients,
        "database": database,
        "controller_workers": workers,
        "controller_threads": _controller_threads(),
        "invoker_threads": invoker_threads,
        "device": device,
        "workdir": str(scratch) if keep else None,
    }
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": {"start": list(load_start), "end": list(os.getloadavg())},
    }
    results = results_document(machine, settings, databases)
    print_table(results, echo)
    results["code"] = code_version()  # in what run() returns too
    write_results(out, finite(results), echo)
    failed = [k for k, v in databases.items() if "failed" in v]
    if failed:
        raise click.ClickException(f"the run failed on {', '.join(failed)} (see {out})")
    return results


def results_document(
    machine: dict[str, Any], settings: dict[str, Any], databases: dict[str, Any]
) -> dict[str, Any]:
    """The JSON document: definitions, machine, settings, per-database results, targets."""
    measured = {k: v["targets"] for k, v in databases.items() if "targets" in v}
    return {
        "benchmark": "overhead",
        "definitions": _definitions(),
        "machine": machine,
        "settings": {
            **settings,
            "model": "tiny random Llama (sllm.tiny_models, seed 0), float32",
            "function": FUNCTION_DEF,
            "controller_request": {"path": INVOCATION_PATH, "body": CONTROLLER_BODY},
            "direct_request": {"path": "/v1/invoke", "body": DIRECT_BODY},
        },
        "databases": databases,
        "targets": measured,
        "all_met": all_met(measured) and not any("failed" in v for v in databases.values()),
    }


def _publish_model(scratch: Path, echo: Echo) -> str:
    from transformers.utils import logging as hf_logging

    from sllm.store import open_store, push_model
    from sllm.tiny_models import build_tiny_model

    hf_logging.disable_progress_bar()
    echo(f"building and publishing the tiny model under {scratch} ...")
    src = build_tiny_model("llama", scratch / "model", seed=0)
    uri = f"file://{(scratch / 'store').resolve()}"
    push_model(str(src), "tiny", open_store(uri), progress=False)
    return uri


@contextmanager
def _database(name: str, scratch: Path, postgres_url: str) -> Iterator[str]:
    if name == "sqlite":
        path = (scratch / "sqlite" / "sllm.db").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{path}"
    else:
        with postgres_database(postgres_url) as url:
            yield url


def _measure_database(
    url: str,
    *,
    store_uri: str,
    workdir: Path,
    requests: int,
    duration: float,
    warmup: float,
    rounds: int,
    clients: list[int],
    workers: int,
    invoker_threads: int,
    device: str,
    echo: Echo,
) -> dict[str, Any]:
    from ._overhead_load import closed_loop, latency_pairs, routes, warm_up

    stack = Stack(
        database_url=url,
        store_uri=store_uri,
        workdir=workdir,
        workers=workers,
        invoker_threads=invoker_threads,
        device=device,
    )
    try:
        stack.start()
        ps = routes(stack)
        ctl, direct = ps["controller"], ps["direct"]
        echo("  warm-up (the first request loads the model) ...")
        warm_up(ctl, direct, WARMUP_REQUESTS)
        echo(f"  latency: {requests} pairs, one client ...")
        server0, cpu0 = stack.server_latency(), stack.cpu_seconds()
        pairs = latency_pairs(ctl, direct, requests)
        server1, cpu1 = stack.server_latency(), stack.cpu_seconds()
        samples = LatencySamples(pairs.controller, pairs.direct, pairs.runtime)
        latency = samples.summarise()
        latency["errors"] = dict(pairs.errors)
        with stack.controller_client() as client:
            records = [stack.activation(client, a) if a else None for a in pairs.activations]
        latency["controller_breakdown"] = breakdown(samples, records, server0, server1)
        latency["cpu_ms_per_pair"] = {
            k: (cpu1[k] - cpu0[k]) * 1000 / max(requests, 1) for k in cpu1
        }
        throughput: dict[str, Any] = {}
        for n in clients:
            point: list[dict[str, LoadRun]] = []
            for r in range(rounds):
                runs = {}
                for path in (direct, ctl):
                    runs[path.name] = closed_loop(
                        path, n, warmup=warmup, duration=duration, cpu=stack.cpu_seconds
                    )
                point.append(runs)
                d, c = runs["direct"], runs["controller"]
                echo(
                    f"  {n:3d} clients, round {r + 1}/{rounds}: direct {d.rate:7.1f}/s "
                    f"({d.errors} errors), controller {c.rate:7.1f}/s ({c.errors} errors); "
                    f"load generator {c.client_cpu_s / duration:.2f} cores"
                )
            throughput[str(n)] = throughput_point(point)
    except Exception as exc:
        raise RuntimeError(f"{type(exc).__name__}: {exc}\n{stack.logs()}") from exc
    finally:
        stack.stop()
    return {
        "url": hide_password(url),
        "latency_ms": latency,
        "throughput": throughput,
        "targets": targets(latency, throughput),
    }


def breakdown(
    samples: LatencySamples,
    records: list[dict[str, Any] | None],
    server_before: tuple[float, float],
    server_after: tuple[float, float],
) -> dict[str, Any]:
    """Where a controller request's time goes, from its activation record (ms).

    before_dispatch   the Run's creation to its slot on the instance (wait_ms:
                      the dispatcher's database reads and its conditional UPDATE)
    dispatch_to_end   the slot to the last event (duration_ms): the hop to the
                      invoker and everything there
    dispatch_minus_runtime
                      dispatch_to_end - the paired direct request's runtime (a
                      proxy: this request's own runtime is not recorded)
    outside_run       controller_e2e - before_dispatch - dispatch_to_end: client
                      and server HTTP, authentication, the function lookup,
                      validation, storing the activation, the response
    server_mean       the controller's own mean request latency (its histogram,
                      first byte in to response out, as Flask sees it) next to
                      the mean controller_e2e at the client
    """
    wait, dur, outside, minus = [], [], [], []
    for e2e, runtime, rec in zip(samples.controller, samples.runtime, records, strict=True):
        if rec is None or rec.get("wait_ms") is None or rec.get("duration_ms") is None:
            continue
        w, d = rec["wait_ms"] / 1000, rec["duration_ms"] / 1000
        wait.append(w)
        dur.append(d)
        outside.append(e2e - w - d)
        minus.append(d - runtime)
    calls = server_after[1] - server_before[1]
    server_mean = (server_after[0] - server_before[0]) / calls * 1000 if calls > 0 else math.nan
    client_mean = summary_ms(samples.controller)["mean"]
    return {
        "records": len(wait),
        "before_dispatch": summary_ms(wait),
        "dispatch_to_end": summary_ms(dur),
        "dispatch_minus_runtime": summary_ms(minus),
        "outside_run": summary_ms(outside),
        "server_mean": server_mean,
        "client_mean": client_mean,
        "client_minus_server_mean": client_mean - server_mean,
        "server_requests_counted": calls,
    }


def _controller_threads() -> int:
    from sllm.controller import ControllerConfig

    return ControllerConfig().threads


def _definitions() -> dict[str, str]:
    return {
        "controller_e2e": "client wall time of one invocation through the controller (ms)",
        "direct_e2e": "client wall time of the same request sent to the invoker's /v1/invoke",
        "runtime": "the direct request's timing.total_s: inside the invoker, receipt to done",
        "overhead_vs_runtime": "controller_e2e - runtime of the paired direct request "
        "(the issue's overhead; targets use its per-pair p50/p99)",
        "overhead_vs_direct": "controller_e2e - direct_e2e of the same pair",
        "direct_vs_runtime": "direct_e2e - runtime: the invoker's own HTTP cost",
        "paired": "percentiles of the per-pair differences",
        "p50_difference": "p50 of the first series minus p50 of the second",
        "throughput": "closed loop: successful invocations per second in the counted window; "
        "ratio = median controller rps / median direct rps",
        "client_cpu_cores": "CPU seconds of the load generator per second of the window",
        "server_cpu_cores": "CPU seconds of each server's process group per second",
        "host_busy": "share of all the host's CPUs busy during the window",
        "cpu_ms_per_pair": "CPU ms of each server's process group per latency pair (the "
        "controller serves one request of the pair, the invoker both; background loops "
        "and heartbeats included)",
        "server_cpu_ms_per_request": "CPU ms of each server's process group per successful "
        "request in a throughput window",
    }


def finite(doc: Any) -> Any:
    """NaN and infinities as null (JSON has no NaN)."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return None
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [finite(v) for v in doc]
    return doc


def print_table(res: dict[str, Any], echo: Echo) -> None:
    s, m = res["settings"], res["machine"]
    echo(
        f"\noverhead: {m['cpus']} CPUs, controller {s['controller_workers']} workers x "
        f"{s['controller_threads']} threads, invoker {s['invoker_threads']} threads, "
        f"{s['requests']} pairs, {s['duration_s']:g} s x {s['rounds']} rounds per point, "
        f"loadavg {m['loadavg']['start'][0]:.2f} -> {m['loadavg']['end'][0]:.2f}"
    )
    for name, db in res["databases"].items():
        if "skipped" in db or "failed" in db:
            why = db.get("skipped") or db["failed"].splitlines()[0]
            echo(f"\n[{name}] {'skipped' if 'skipped' in db else 'FAILED'}: {why}")
            continue
        lat = db["latency_ms"]
        echo(f"\n[{name}] one client, {lat['pairs']} pairs (ms)   p50      p90      p99     mean")
        rows = [
            ("controller e2e", lat["controller_e2e"]),
            ("direct e2e", lat["direct_e2e"]),
            ("runtime (invoker timing)", lat["runtime"]),
            ("overhead vs runtime", lat["overhead_vs_runtime"]["paired"]),
            ("overhead vs direct", lat["overhead_vs_direct"]["paired"]),
            ("direct vs runtime", lat["direct_vs_runtime"]["paired"]),
        ]
        bd = lat["controller_breakdown"]
        rows += [
            ("  controller: before dispatch", bd["before_dispatch"]),
            ("  controller: dispatch - runtime", bd["dispatch_minus_runtime"]),
            ("  controller: outside the run", bd["outside_run"]),
        ]
        for label, v in rows:
            echo(f"{label:34} {v['p50']:8.2f} {v['p90']:8.2f} {v['p99']:8.2f} {v['mean']:8.2f}")
        echo(
            f"{'  controller server mean / client':34} {bd['server_mean']:8.2f} / "
            f"{bd['client_mean']:.2f}"
        )
        cpu = lat.get("cpu_ms_per_pair") or {}
        if cpu:
            echo(
                "  CPU ms per pair: "
                + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
                + " (the controller serves one request of a pair, the invoker both)"
            )
        if lat["errors"]:
            echo(f"errors: {lat['errors']}")
        echo(
            f"{'clients':>8} {'direct/s':>10} {'ctl/s':>10} {'ratio':>7} {'errors d/c':>11} "
            f"{'p50 ms d/c':>15} {'ctl CPU ms/req':>15} {'loadgen cores':>14}"
        )
        for n, p in db["throughput"].items():
            p50 = p["median_p50_ms"]
            echo(
                f"{n:>8} {p['direct_rps']:10.1f} {p['controller_rps']:10.1f} {p['ratio']:7.2f} "
                f"{p['errors']['direct']:>5}/{p['errors']['controller']:<5} "
                f"{p50['direct']:7.1f}/{p50['controller']:<7.1f} "
                f"{p['controller_cpu_ms_per_request']:15.2f} {p['client_cpu_cores_max']:14.2f}"
            )
        for k, t in db["targets"].items():
            value = "-" if t["value"] is None else f"{t['value']:.2f}"
            echo(f"  {k:52} {value:>8}  {'met' if t['met'] else 'NOT met'}")
    echo(f"\nall targets met: {'yes' if res['all_met'] else 'NO'}")


def _clients(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not counts or any(not 1 <= c <= CONCURRENCY for c in counts):
        raise click.BadParameter(f"each client count must be in [1, {CONCURRENCY}], got {value!r}")
    return counts


@click.command("overhead")
@click.option(
    "--requests",
    type=click.IntRange(min=2),
    default=300,
    show_default=True,
    help="Latency pairs at one client.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds counted per throughput run.",
)
@click.option(
    "--warmup",
    type=click.FloatRange(min=0.0),
    default=2.0,
    show_default=True,
    help="Untimed seconds before each throughput run's window.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Throughput rounds (direct then controller) per client count.",
)
@click.option(
    "--clients",
    default="16,64",
    show_default=True,
    callback=_clients,
    help="Concurrent clients per throughput point, comma-separated.",
)
@click.option(
    "--database",
    type=click.Choice(["sqlite", "postgres", "both"]),
    default="both",
    show_default=True,
    help="The controller's database (both: postgres skipped if unreachable).",
)
@click.option(
    "--postgres-url",
    envvar="SLLM_BENCH_POSTGRES_URL",
    default=DEFAULT_POSTGRES,
    show_default=True,
    help="A server where the benchmark may create and drop a database.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Controller worker processes.",
)
@click.option(
    "--invoker-threads",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Invoker request threads.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Invoker device: auto, cpu, cuda[:N].",
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("benchmarks/scratch/overhead"),
    show_default=True,
    help="Scratch folder (model, store, logs, SQLite file).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("benchmarks/results/overhead.json"),
    show_default=True,
    help="JSON results file.",
)
@click.option("--keep", is_flag=True, help="Keep the scratch folder (logs, store) afterwards.")
def command(**flags: Any) -> None:
    """Controller overhead at one client, and throughput vs the invoker direct (16, 64 clients)."""
    started = time.monotonic()
    # SIGTERM (a `timeout`, a CI cancel) unwinds like Ctrl-C, so the servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    run(echo=click.echo, **flags)
    click.echo(f"took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    command()

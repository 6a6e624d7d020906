"""The overhead benchmark's clients: paired single-client latency, and closed-loop load.

Both paths send the same request (one token, greedy) over keep-alive
httpx clients. `Route` hides which endpoint and how its answer is checked.
"""

from __future__ import annotations

import resource
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from ._overhead_stack import CONTROLLER_BODY, DIRECT_BODY, INVOCATION_PATH, Stack, host_cpu
from ._overhead_stats import LoadRun

BARRIER_TIMEOUT = 60.0  # for every client thread to have its HTTP client
ERROR_PAUSE = 0.01  # a client that got an error waits this long, so a dead server is not spun on


@dataclass(frozen=True)
class Answer:
    """One request's outcome: ok, e2e seconds, the runtime's own seconds, the activation id."""

    ok: bool
    seconds: float
    runtime: float | None = None
    activation: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Route:
    """How to send the benchmark's request on one path and read its answer."""

    name: str
    make_client: Callable[[], httpx.Client]
    send: Callable[[httpx.Client], Answer]


def routes(stack: Stack, timeout: float = 60.0) -> dict[str, Route]:
    """The two paths: "controller" (the public API) and "direct" (the invoker's /v1/invoke)."""

    def through_controller(client: httpx.Client) -> Answer:
        start = time.perf_counter()
        try:
            r = client.post(INVOCATION_PATH, json=CONTROLLER_BODY)
            seconds = time.perf_counter() - start
        except httpx.HTTPError as exc:
            return Answer(False, time.perf_counter() - start, error=type(exc).__name__)
        if r.status_code != 200:
            return Answer(False, seconds, error=f"HTTP {r.status_code}")
        return Answer(True, seconds, activation=r.headers.get("X-Activation-Id"))

    def direct(client: httpx.Client) -> Answer:
        start = time.perf_counter()
        try:
            r = client.post("/v1/invoke", json=DIRECT_BODY)
            seconds = time.perf_counter() - start
        except httpx.HTTPError as exc:
            return Answer(False, time.perf_counter() - start, error=type(exc).__name__)
        if r.status_code != 200:
            return Answer(False, seconds, error=f"HTTP {r.status_code}")
        try:
            runtime = float(r.json()["timing"]["total_s"])
        except (ValueError, KeyError, TypeError):
            return Answer(False, seconds, error="answer without timing.total_s")
        return Answer(True, seconds, runtime=runtime)

    return {
        "controller": Route(
            "controller", lambda: stack.controller_client(timeout), through_controller
        ),
        "direct": Route("direct", lambda: stack.invoker_client(timeout), direct),
    }


@dataclass
class Pairs:
    """Paired single-client samples (seconds) and what went wrong."""

    controller: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    runtime: list[float] = field(default_factory=list)
    activations: list[str | None] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


def latency_pairs(ctl: Route, direct: Route, requests: int) -> Pairs:
    """`requests` pairs, one client: each pair one request per path, back to back.

    The order within a pair alternates (controller first, then direct first, ...)
    so neither path always runs right after the other. A pair with an error is
    dropped (and counted).
    """
    out = Pairs()
    with ctl.make_client() as c_client, direct.make_client() as d_client:
        for i in range(requests):
            if i % 2 == 0:
                a = ctl.send(c_client)
                b = direct.send(d_client)
            else:
                b = direct.send(d_client)
                a = ctl.send(c_client)
            if not a.ok:
                out.errors[f"controller: {a.error}"] += 1
            if not b.ok:
                out.errors[f"direct: {b.error}"] += 1
            if a.ok and b.ok and b.runtime is not None:
                out.controller.append(a.seconds)
                out.direct.append(b.seconds)
                out.runtime.append(b.runtime)
                out.activations.append(a.activation)
    return out


def warm_up(ctl: Route, direct: Route, requests: int) -> None:
    """Untimed requests on both paths (the first through the controller loads the model)."""
    with ctl.make_client() as c_client, direct.make_client() as d_client:
        first = ctl.send(c_client)
        if not first.ok:
            raise RuntimeError(f"the first invocation through the controller failed: {first.error}")
        for _ in range(requests):
            for path, client in ((ctl, c_client), (direct, d_client)):
                answer = path.send(client)
                if not answer.ok:
                    raise RuntimeError(f"warm-up request on {path.name} failed: {answer.error}")


def closed_loop(
    path: Route,
    clients: int,
    *,
    warmup: float,
    duration: float,
    cpu: Callable[[], dict[str, float]] | None = None,
) -> LoadRun:
    """`clients` threads, each sending its next request when the last one answered.

    Counts completions that end inside [start + warmup, start + warmup +
    duration]; requests still running at the end are waited for but not counted.
    `cpu` (optional) returns CPU seconds per server, read at both ends of the window.
    """
    barrier = threading.Barrier(clients + 1)
    lock = threading.Lock()
    ok = errors = warm_errors = 0
    latencies: list[float] = []
    kinds: Counter[str] = Counter()
    window: list[float] = []  # [start, end], set once every client is ready
    go = threading.Event()

    def client_loop() -> None:
        nonlocal ok, errors, warm_errors
        with path.make_client() as client:
            try:
                barrier.wait(BARRIER_TIMEOUT)
            except threading.BrokenBarrierError:
                return
            go.wait()
            start, end = window
            while True:
                answer = path.send(client)
                now = time.perf_counter()
                with lock:
                    if start <= now <= end:
                        if answer.ok:
                            ok += 1
                            latencies.append(answer.seconds)
                        else:
                            errors += 1
                            kinds[answer.error or "error"] += 1
                    elif now < start and not answer.ok:
                        warm_errors += 1
                if now >= end:
                    return
                if not answer.ok:
                    time.sleep(ERROR_PAUSE)

    threads = [
        threading.Thread(target=client_loop, name=f"bench-client-{i}", daemon=True)
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    try:
        barrier.wait(BARRIER_TIMEOUT)
    except threading.BrokenBarrierError:
        raise RuntimeError(f"{clients} {path.name} clients did not all start") from None
    begin = time.perf_counter()
    window[:] = [begin + warmup, begin + warmup + duration]
    go.set()
    _sleep_until(window[0])
    cpu0, host0, servers0 = _process_cpu(), host_cpu(), cpu() if cpu else {}
    _sleep_until(window[1])
    cpu1, host1, servers1 = _process_cpu(), host_cpu(), cpu() if cpu else {}
    for t in threads:
        t.join()
    busy = (host1[0] - host0[0]) / (host1[1] - host0[1]) if host1[1] > host0[1] else None
    return LoadRun(
        seconds=duration,
        ok=ok,
        errors=errors,
        latencies=latencies,
        client_cpu_s=cpu1 - cpu0,
        server_cpu_s={k: servers1[k] - servers0[k] for k in servers1},
        host_busy=busy,
        warmup_errors=warm_errors,
        error_kinds=dict(kinds),
    )


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sleep_until(t: float) -> None:
    left = t - time.perf_counter()
    if left > 0:
        time.sleep(left)

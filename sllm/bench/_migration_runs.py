"""The five measurements of the migration benchmark, each one request through a controller.

    baseline             the request streamed to its end, nothing moved: TPOT, total time
    live                 at token `at`, POST .../activations/{id}/migrate {"to": the other
                         invoker} (from a thread: the client keeps reading); the pause after
                         it; the move record's rounds, tokens recomputed, switch and total
    stop_and_recompute   the same through the controller with SLLM_MIGRATION_MAX_ROUNDS=0
    preempt_and_restart  at token `at` the client closes its stream and cancels the
                         generation (POST .../activations/{id}/cancel: closing alone leaves
                         it running a while for a reconnect) and sends the request again at
                         once: the pause from the abort to the rerun's token `at + 1`, the
                         time to finish
    resume_after_kill    at token `at` the serving invoker's process group gets SIGKILL: the
                         largest gap after it, and its parts: detection (the kill to the
                         controller's "lost" log line), the destination's load (its
                         "resumed on" log line: warm, or the tier and seconds), and the
                         prefill of the whole sequence on the destination, timed apart (a
                         request of the same length, max_tokens 1, straight to its instance:
                         the invoker's own TTFT); beside them, the resumed stream's own TTFT
                         on the destination (its invoker's TTFT histogram, before and after)

Every output is checked against the others of its prompt (greedy: the same text, token by
token); a mismatch, a migration that did not move, or a stream that ended early raises.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from ._migration_stack import FUNCTION, NAMESPACE, Cluster
from ._migration_stats import histogram_totals, pause_after, resume_parts, tpot

STREAM_PATH = f"/api/v1/namespaces/{NAMESPACE}/functions/{FUNCTION}/invocations?stream=true"
VARIANTS = ("baseline", "live", "stop_and_recompute", "preempt_and_restart", "resume_after_kill")


@dataclass
class Trace:
    """What the client saw of one stream (perf_counter times; `mark`: the action's)."""

    sent: float
    times: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)
    activation: str = ""
    invoker: str = ""
    done: bool = False
    mark: float = 0.0
    mark_wall: float = 0.0


Action = Callable[[Trace], bool]  # True: close the stream now


def stream(
    client: httpx.Client,
    tokens: list[int],
    max_tokens: int,
    at: int = 0,
    action: Action | None = None,
) -> Trace:
    """Stream one greedy request; at its `at`-th token (if `action`) call `action`."""
    trace = Trace(sent=time.perf_counter())
    body = {"tokens": tokens, "max_tokens": max_tokens, "temperature": 0}
    with client.stream("POST", STREAM_PATH, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the stream answered {response.status_code}: {response.read()!r}")
        for line in response.iter_lines():
            if not line:
                continue
            ev = json.loads(line)
            kind = ev.get("event")
            if kind == "token":
                trace.times.append(time.perf_counter())
                trace.text.append(ev.get("text", ""))
                trace.indexes.append(ev.get("index"))
                if action is not None and len(trace.times) == at:
                    trace.mark, trace.mark_wall = time.perf_counter(), time.time()
                    if action(trace):
                        return trace
            elif kind == "start":
                trace.activation, trace.invoker = ev["activationId"], ev["invoker"]
            elif kind == "done":
                trace.done = True
            elif kind == "error":
                raise RuntimeError(f"the stream ended in an error: {ev}")
    return trace


def complete(trace: Trace, max_tokens: int, what: str) -> None:
    """RuntimeError unless `trace` ran to its end with every token once."""
    if not trace.done or trace.indexes != list(range(1, max_tokens + 1)):
        raise RuntimeError(
            f"{what}: the stream ended with {len(trace.times)} of {max_tokens} tokens "
            f"(done: {trace.done}; indexes {trace.indexes[:3]}...{trace.indexes[-3:]})"
        )


@dataclass
class Runner:
    """The measurements of one prompt on `cluster` (see the module docstring)."""

    cluster: Cluster
    prompt: list[int]
    output_len: int
    at: int
    probe: list[int]  # prompt + enough further tokens for the resume's separate prefill
    outputs: dict[str, str] = field(default_factory=dict)

    def run(self, variant: str) -> dict[str, Any]:
        """One measurement; its figures (seconds)."""
        self.cluster.wait_warm()
        row: dict[str, Any] = getattr(self, variant)()
        return row

    def check_outputs(self) -> None:
        """RuntimeError unless every variant's text equals the baseline's (greedy)."""
        ref = self.outputs.get("baseline")
        for variant, text in self.outputs.items():
            if ref is not None and text != ref:
                diverged = next(
                    (i for i, (a, b) in enumerate(zip(text, ref, strict=False)) if a != b),
                    min(len(text), len(ref)),
                )
                raise RuntimeError(
                    f"prompt of {len(self.prompt)} tokens: {variant}'s output differs from the "
                    f"baseline's at character {diverged} (greedy decoding must not change)"
                )

    # ------------------------------------------------------------ the variants
    def baseline(self) -> dict[str, Any]:
        """The request streamed to its end, unmoved."""
        with self.cluster.api() as api:
            trace = stream(api, self.prompt, self.output_len)
        complete(trace, self.output_len, "baseline")
        self.outputs["baseline"] = "".join(trace.text)
        return {
            "tpot_s": tpot(trace.times),
            "ttft_s": trace.times[0] - trace.sent,
            "total_s": trace.times[-1] - trace.sent,
        }

    def live(self) -> dict[str, Any]:
        """Migrated in rounds while it streams (the controller's default policy)."""
        return self._migrated("live", "live")

    def stop_and_recompute(self) -> dict[str, Any]:
        """Migrated through the controller with no live rounds."""
        return self._migrated("stop", "stop_and_recompute")

    def preempt_and_restart(self) -> dict[str, Any]:
        """Aborted by the client and sent again from the prompt."""
        with self.cluster.api() as api:
            first = stream(api, self.prompt, self.output_len, self.at, lambda t: True)
            path = f"/api/v1/namespaces/{NAMESPACE}/activations/{first.activation}/cancel"
            api.post(path).raise_for_status()  # Shepherd-style: the preempted run stops
            rerun = stream(api, self.prompt, self.output_len)
        complete(rerun, self.output_len, "preempt_and_restart (the rerun)")
        self.outputs["preempt_and_restart"] = "".join(first.text) + "".join(
            rerun.text[len(first.text) :]
        )
        if rerun.text[: len(first.text)] != first.text:
            raise RuntimeError("preempt_and_restart: the rerun began with another output")
        return {
            "pause_s": rerun.times[len(first.times)] - first.mark,
            "finish_s": rerun.times[-1] - first.sent,
            "rerun_ttft_s": rerun.times[0] - rerun.sent,
            "same_invoker": rerun.invoker == first.invoker,
        }

    def resume_after_kill(self) -> dict[str, Any]:
        """Its invoker killed mid-stream; the controller resumes it on the other one."""
        killed: dict[str, Any] = {}

        def kill(trace: Trace) -> bool:
            killed["name"] = trace.invoker
            killed["at"] = self.cluster.kill(trace.invoker)
            return False

        before = {name: self._ttft_totals(name) for name in self.cluster.invokers}
        try:
            with self.cluster.api() as api:
                trace = stream(api, self.prompt, self.output_len, self.at, kill)
            complete(trace, self.output_len, "resume_after_kill")
            self.outputs["resume_after_kill"] = "".join(trace.text)
            record = self.cluster.activation(trace.activation)
            moves = [m for m in record.get("moves") or [] if m.get("kind") == "resume"]
            if not moves:
                raise RuntimeError(f"resume_after_kill: no resume recorded: {record}")
            move = moves[0]
            parts = resume_parts(record.get("log_lines") or [])
            lost_at = parts["lost_at"] if parts["lost_at"] is not None else move["at"]
            resumed_on = parts["resumed_on"] or move["to"]
            after = self._ttft_totals(resumed_on)  # before the probe adds its own
            served = after[1] - before[resumed_on][1]
            own_ttft = (after[0] - before[resumed_on][0]) / served if served == 1 else math.nan
            prefill_s = self._prefill(resumed_on, len(self.prompt) + int(move["tokens"]))
        finally:
            if "name" in killed:
                self.cluster.restart(killed["name"])
        detection = max(0.0, lost_at - killed["at"])
        load = float(parts["load_s"] or 0.0)
        return {
            "gap_s": pause_after(trace.times, trace.mark),
            "detection_s": detection,
            "load_s": load,
            "prefill_s": prefill_s,
            "parts_s": detection + load + prefill_s,
            "resume_ttft_s": own_ttft,
            "relay_pause_s": (move.get("pause_ms") or 0.0) / 1000,
            "tier": parts["tier"] or "unknown",
            "resumed_at_token": int(move["tokens"]),
        }

    # ------------------------------------------------------------ helpers
    def _migrated(self, controller: str, variant: str) -> dict[str, Any]:
        """A stream through `controller`, migrated to the other invoker at token `at`."""
        asked: dict[str, Any] = {}

        def ask(trace: Trace) -> bool:
            to = next(n for n in self.cluster.invokers if n != trace.invoker)

            def post() -> None:
                try:
                    asked.update(self.cluster.migrate(trace.activation, to))
                except (httpx.HTTPError, RuntimeError) as exc:
                    asked["error"] = str(exc)

            thread = threading.Thread(target=post, daemon=True, name="bench-migrate")
            thread.start()
            asked["thread"] = thread
            return False

        with self.cluster.api(controller) as api:
            trace = stream(api, self.prompt, self.output_len, self.at, ask)
        asked["thread"].join(30)
        if "error" in asked:
            raise RuntimeError(f"{variant}: the migrate request failed: {asked['error']}")
        complete(trace, self.output_len, variant)
        self.outputs[variant] = "".join(trace.text)
        record = self.cluster.activation(trace.activation)
        moves = [m for m in record.get("moves") or [] if m.get("kind") == "migrate"]
        if not moves or moves[-1].get("outcome") != "moved":
            raise RuntimeError(
                f"{variant}: the generation did not move before its end ({moves}); give a "
                "longer --output-len"
            )
        move = moves[-1]
        return {
            "pause_s": pause_after(trace.times, trace.mark),
            "tpot_s": tpot(trace.times),
            "rounds": move["rounds"],
            "tokens_recomputed": move["tokens_recomputed"],
            "switch_s": float(move["switch_ms"]) / 1000,
            "migration_s": float(move["total_ms"]) / 1000,
            "relay_pause_s": (move.get("pause_ms") or 0.0) / 1000,
            "moved_at_token": move.get("tokens"),
            "total_s": trace.times[-1] - trace.sent,
        }

    def _ttft_totals(self, invoker: str) -> tuple[float, float]:
        """(sum, count) of the invoker's warm-start TTFT histogram."""
        with self.cluster.invoker(invoker) as client:
            text = client.get("/metrics", timeout=5).text
        return histogram_totals(text, "sllm_invoker_ttft_seconds", 'tier="warm"')

    def _prefill(self, invoker: str, length: int) -> float:
        """The invoker's TTFT of a `length`-token request on its warm instance (max_tokens 1)."""
        warm = self.cluster.wait_warm([invoker])[invoker]
        body = {
            "function": f"{NAMESPACE}/{FUNCTION}",
            "model": self.cluster.model,
            "task": "generate",
            "concurrency": 1,
            "instance": warm["instance"],
            "version": warm["version"],
            "tokens": self.probe[:length],
            "max_tokens": 1,
            "temperature": 0,
            "stream": True,
        }
        with (
            self.cluster.invoker(invoker) as client,
            client.stream("POST", "/v1/invoke", json=body) as response,
        ):
            if response.status_code != 200:
                raise RuntimeError(f"the prefill probe answered {response.status_code}")
            for line in response.iter_lines():
                ev = json.loads(line) if line else {}
                if ev.get("event") == "done":
                    return float(ev["timing"]["ttft_s"])
        raise RuntimeError("the prefill probe's stream ended without its done event")

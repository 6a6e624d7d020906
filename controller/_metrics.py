"""The controller's Prometheus metrics.

Under gunicorn every worker counts for itself; when PROMETHEUS_MULTIPROC_DIR
is set (the server sets it) `/metrics` aggregates all workers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

if TYPE_CHECKING:
    from ._activations import Run

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ControllerMetrics:
    """Requests, latencies, activations by status, cold starts by tier, queue lengths,
    invokers by state."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sllm_controller_requests", "HTTP requests", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "sllm_controller_request_seconds",
            "HTTP request latency (to the last byte for streams)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.activations = Counter(
            "sllm_activations", "Activations by outcome", ["task", "status"], registry=r
        )
        self.starts = Counter(
            "sllm_starts", "Dispatches by how the instance was found", ["kind", "tier"], registry=r
        )
        self.ttft = Histogram(
            "sllm_ttft_seconds",
            "Time to first token through the controller",
            ["cold"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.resumes = Counter(
            "sllm_resumes",
            "Generations continued after their invoker was lost, by outcome: resumed (a "
            "destination took over), failed (that attempt failed too), exhausted (attempts "
            "or deadline used up), refused (the function's on_invoker_loss is fail)",
            ["outcome"],
            registry=r,
        )
        self.queue = Gauge(
            "sllm_queue_length",
            "Requests waiting for an instance in this process",
            registry=r,
            multiprocess_mode="livesum",
        )
        # From the database, set by every maintenance pass: the latest pass of any live
        # worker is the answer (they all read the same table).
        self.invokers = Gauge(
            "sllm_invokers",
            "Invokers by state (active, draining, drained, lost)",
            ["state"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )

    def observe_start(self, tier: str, cold: bool) -> None:
        """A request reached a model: warm, or cold from a tier."""
        self.starts.labels("cold" if cold else "warm", tier).inc()

    def observe_activation(self, run: Run) -> None:
        """An activation ended."""
        self.activations.labels(run.task, run.status).inc()
        if run.ttft_ms is not None:
            self.ttft.labels(str(bool(run.cold)).lower()).observe(run.ttft_ms / 1000)

    def observe_invokers(self, counts: Mapping[str, int]) -> None:
        """The invokers by state, as the database has them now."""
        for state, n in counts.items():
            self.invokers.labels(state).set(n)

    def render(self) -> bytes:
        """The text exposition: every worker's when running multi-process."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))

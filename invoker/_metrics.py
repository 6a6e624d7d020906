"""Prometheus metrics of one invoker, in a registry of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sllm.core.messages import LoadReport

if TYPE_CHECKING:
    from ._service import Invoker

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)


class InvokerMetrics:
    """Counters and histograms the service updates; tier gauges read at scrape time."""

    def __init__(self, invoker: Invoker) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sllm_invoker_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.loads = Counter(
            "sllm_invoker_loads", "Model loads by the tier they came from", ["tier"], registry=r
        )
        self.load_seconds = Histogram(
            "sllm_invoker_load_seconds",
            "Cold load time by tier",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "sllm_invoker_ttft_seconds",
            "Time to first token from request arrival, by tier (warm when no load)",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("sllm_invoker_generated_tokens", "Tokens generated", registry=r)
        self.fetched = Counter(
            "sllm_invoker_store_bytes", "Bytes downloaded from the object store", registry=r
        )
        tier_bytes = Gauge(
            "sllm_invoker_tier_used_bytes", "Bytes held per tier", ["tier"], registry=r
        )
        tier_bytes.labels("nvme").set_function(lambda: invoker.nvme.used_bytes)
        tier_bytes.labels("dram").set_function(lambda: invoker.pool.used_bytes)
        tier_cap = Gauge(
            "sllm_invoker_tier_capacity_bytes", "Capacity per tier", ["tier"], registry=r
        )
        tier_cap.labels("nvme").set(invoker.nvme.capacity)
        tier_cap.labels("dram").set(invoker.pool.capacity)
        Gauge("sllm_invoker_instances", "Loaded instances", registry=r).set_function(
            lambda: len(invoker.instances.to_json())
        )
        Gauge("sllm_invoker_load_queue", "Loads in flight", registry=r).set_function(
            invoker.instances.queue_length
        )
        # Migration targets (see _holds).
        Gauge(
            "sllm_invoker_held_generations",
            "Generations held as migration targets (prefilled, waiting for their continue)",
            registry=r,
        ).set_function(lambda: sum(1 for e in invoker.generations.running() if e.held))
        self.hold_expired = Counter(
            "sllm_invoker_hold_expired",
            "Held generations cancelled because no continue came within the hold timeout",
            registry=r,
        )
        self.migration_prefill_tokens = Counter(
            "sllm_invoker_migration_prefill_tokens",
            "Tokens computed by prefill rounds of held generations",
            registry=r,
        )
        self.migration_prefill_seconds = Histogram(
            "sllm_invoker_migration_prefill_seconds",
            "Time a prefill round of a held generation took to answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.migration_recomputed = Histogram(
            "sllm_invoker_migration_recomputed_tokens",
            "Tokens a continue recomputed (the final round of a migration)",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )

    def observe_load(self, report: LoadReport) -> None:
        """Count a load (cold ones by tier, warm ones as tier gpu)."""
        self.loads.labels(report.tier).inc()
        if report.cold:
            self.load_seconds.labels(report.tier).observe(report.load_seconds)
            self.fetched.inc(report.fetched_bytes)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)

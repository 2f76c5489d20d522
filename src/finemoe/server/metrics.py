"""Prometheus metrics of one server, in its own CollectorRegistry (no process-global registry).

The scheduler thread updates them (prometheus-client metrics are thread-safe); GET /metrics renders them.
"""
from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from finemoe.server.scheduler import SchedulerMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = ("stop", "length", "cancelled", "error", "invalid")


class ServerMetrics(SchedulerMetrics):
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("finemoe_time_to_first_token_seconds", "Submission to first token (includes queueing)",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("finemoe_time_per_output_token_seconds", "Mean gap between a request's later tokens",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.hits = Counter("finemoe_expert_hits", "Expert uses found resident in the device cache", registry=r)
        self.misses = Counter("finemoe_expert_misses", "Expert uses that waited for a copy", registry=r)
        self.bytes_copied = Counter("finemoe_expert_bytes_copied", "Expert bytes copied host -> device", registry=r)
        self.occupancy = Gauge("finemoe_expert_cache_occupancy_ratio", "Resident experts / cache slots", registry=r)
        self.queue_depth = Gauge("finemoe_queue_depth", "Requests waiting in the queue", registry=r)
        self.running = Gauge("finemoe_running_requests", "Requests in the engine's batch", registry=r)
        self.queue_wait = Histogram("finemoe_queue_wait_seconds", "Queue entry to admission into the engine",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("finemoe_batch_size", "Requests in the batch at each engine step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.requests = Counter("finemoe_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("finemoe_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.output_tokens = Counter("finemoe_generation_tokens", "Generated tokens", registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self._totals_owner = None
        self._seen = (0, 0, 0)

    def on_queue(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    def on_admit(self, request, wait_s: float) -> None:
        self.queue_wait.observe(wait_s)

    def on_finish(self, reason: str) -> None:
        self.requests.labels(reason).inc()

    def on_request_done(self, request) -> None:
        """A request left the engine (scheduler thread)."""
        m = request.metrics
        if not math.isnan(m.ttft_s):
            self.ttft.observe(m.ttft_s)
        if m.tokens >= 2:
            self.tpot.observe(m.tpot_s)
        self.output_tokens.inc(m.tokens)
        self.requests.labels(request.finish_reason or "error").inc()

    def on_step(self, engine, running: int) -> None:
        """After each engine iteration: move counters by the runtime's totals since the last look."""
        self.batch_size.observe(running)
        totals = engine.runtime.totals
        if totals is not self._totals_owner:  # a (re)configured runtime starts its totals at zero
            self._totals_owner, self._seen = totals, (0, 0, 0)
        now = (int(totals.hits.sum()), int(totals.misses.sum()), int(totals.bytes_copied))
        for counter, new, old in zip((self.hits, self.misses, self.bytes_copied), now, self._seen):
            if new > old:
                counter.inc(new - old)
        self._seen = now
        self.occupancy.set(float(engine.cache.resident.sum()) / max(engine.cache.capacity, 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Experiment 6: online serving. Requests arrive as in a real arrival trace; one engine serves them one at a
time (batch 1, first come first served); each policy's history starts empty and learns as it serves.

Service times come from the simulator's cost model (Replay over the requests in arrival order); the queue
is applied on top: a request starts when it has arrived and the engine is free. Approximation: during idle
gaps the simulated copy engine does not advance (an idle gap cannot finish a copy early); queued prefetches
never cross a request boundary anyway (the cache drops them at iteration end).
"""
from __future__ import annotations

import csv

import numpy as np

from finemoe.engine.metrics import RequestMetrics
from finemoe.errors import ConfigError


def load_arrivals(path: str, n: int) -> np.ndarray:
    """arrival_s of the first n requests of a workload CSV (header with an `arrival_s` column), from 0."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [float(r["arrival_s"]) for _, r in zip(range(n), csv.DictReader(f))]
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"cannot read arrival times from {path!r} (a CSV with an arrival_s column): {e}") from None
    if len(rows) < n:
        raise ConfigError(f"{path!r} has {len(rows)} requests, fewer than the {n} asked for")
    a = np.array(rows)
    return a - a[0]


def scale_to_load(arrivals: np.ndarray, mean_service_s: float, utilization: float) -> np.ndarray:
    """Stretch (or compress) arrival times so the offered load is `utilization` of one server whose mean
    service time is `mean_service_s`: new mean gap = mean_service_s / utilization. Shape is kept."""
    if not 0 < utilization:
        raise ConfigError("utilization must be positive")
    gap = float(np.diff(arrivals).mean()) if arrivals.size > 1 else 1.0
    return arrivals * (mean_service_s / utilization) / gap


def service_times(metrics: list[RequestMetrics]) -> tuple[np.ndarray, np.ndarray]:
    """(service [R], time to first token within service [R]) from a back-to-back simulated run."""
    service = np.array([m.t_last - m.t_submit for m in metrics])
    first = np.array([m.t_first - m.t_submit for m in metrics])
    return service, first


def fcfs_queue(arrivals: np.ndarray, service: np.ndarray, first: np.ndarray) -> dict[str, np.ndarray]:
    """One server, first come first served: start_r = max(arrival_r, finish_{r-1}).
    Returns per-request latency (arrival -> last token), ttft (arrival -> first token) and wait."""
    start = np.empty_like(service)
    free = -np.inf
    for r in range(service.size):                 # sequential by definition: each start depends on the last finish
        start[r] = max(arrivals[r], free)
        free = start[r] + service[r]
    wait = start - arrivals
    return {"latency_s": wait + service, "ttft_s": wait + first, "wait_s": wait}

"""Per-request and aggregate serving metrics: TTFT, TPOT, hits/misses, bytes, stall, memory peaks."""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class RequestMetrics:
    """Times are `time.perf_counter()` seconds. TTFT runs from submission to the first token on the host;
    TPOT is the mean gap between later tokens. Hits/misses count distinct experts the request's own
    tokens used per layer per iteration; bytes and stall of a shared iteration are split evenly across
    the requests in it."""

    t_submit: float = field(default_factory=time.perf_counter)
    t_admit: float | None = None      # left the server's queue for the engine (server/scheduler.py)
    t_first: float | None = None
    t_last: float | None = None
    tokens: int = 0
    hits: int = 0
    misses: int = 0
    bytes_copied: float = 0.0
    stall_s: float = 0.0
    cpu_experts: int = 0      # of the misses, experts computed on the host CPU (--miss-compute cpu|auto)

    def on_token(self, now: float) -> None:
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.tokens += 1

    @property
    def ttft_s(self) -> float:
        return (self.t_first - self.t_submit) if self.t_first is not None else float("nan")

    @property
    def tpot_s(self) -> float:
        if self.tokens < 2:
            return 0.0
        return (self.t_last - self.t_first) / (self.tokens - 1)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else float("nan")

    def as_dict(self) -> dict:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hit_rate, "bytes_copied": int(round(self.bytes_copied)), "stall_s": self.stall_s,
                "cpu_experts": self.cpu_experts}


def peak_host_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_device_bytes(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def aggregate(metrics: list[RequestMetrics]) -> dict:
    """Summary over requests: medians of latency, sums of counts."""
    def med(xs):
        xs = [x for x in xs if x == x]
        return float(np.median(xs)) if xs else float("nan")
    hits = sum(m.hits for m in metrics)
    misses = sum(m.misses for m in metrics)
    tokens = sum(m.tokens for m in metrics)
    copied = sum(m.bytes_copied for m in metrics)
    return {
        "requests": len(metrics), "output_tokens": tokens,
        "ttft_s": med([m.ttft_s for m in metrics]), "tpot_s": med([m.tpot_s for m in metrics if m.tokens > 1]),
        "hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else float("nan"),
        "bytes_copied": int(round(copied)), "bytes_per_token": copied / tokens if tokens else 0.0,
        "stall_s": sum(m.stall_s for m in metrics), "cpu_experts": sum(m.cpu_experts for m in metrics),
    }

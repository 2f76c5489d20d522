"""What the offload runtime counts and carries between the halves of a layer's host work (eager or captured)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from finemoe.engine.cpu_misses import StaticResult
from finemoe.engine.layer_sequence import LayerDemand
from finemoe.jit import njit

_UNSEEN, _HIT, _MISS, _CPU = 0, 1, 2, 3


@njit
def count_layer_rows(token_rows, topk, experts, hit, cpu, num_experts, row_hits, row_misses, row_cpu):
    """One layer's hits and misses per batch row, added to row_hits, row_misses, row_cpu [B] int64: each distinct
    expert a row's tokens chose counts once, as a hit if the device served it resident (experts [n], hit [n] bool),
    else as a miss, and also in row_cpu if the CPU computed it (cpu [m]). token_rows [T] int64 (row of each token,
    < 0: none); topk [T, k] int64 expert ids."""
    state = np.full(num_experts, _UNSEEN, np.int8)
    for i in range(experts.size):
        state[experts[i]] = _HIT if hit[i] else _MISS
    for e in cpu:
        state[e] = _CPU
    seen = np.zeros(row_hits.size * num_experts, np.bool_)
    for t in range(topk.shape[0]):
        r = token_rows[t]
        if r < 0:
            continue
        for j in range(topk.shape[1]):
            e = topk[t, j]
            if seen[r * num_experts + e]:
                continue
            seen[r * num_experts + e] = True
            if state[e] == _HIT:
                row_hits[r] += 1
            else:
                row_misses[r] += 1
                if state[e] == _CPU:
                    row_cpu[r] += 1


def distinct_experts(topk: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """topk [T, k] int64 -> (experts [n] ascending, tokens per expert [n]): np.unique's answer through a bincount."""
    counts = np.bincount(topk.reshape(-1), minlength=num_experts)     # [J]
    experts = counts.nonzero()[0]
    return experts, counts[experts]


@dataclass
class IterationStats:
    """Per-row (request) counts for one forward pass, plus totals."""

    row_hits: np.ndarray
    row_misses: np.ndarray
    bytes_copied: int
    stall_s: float
    row_cpu: np.ndarray       # [B] missed experts computed on the CPU (counted in row_misses too)


@dataclass
class LayerStep:
    """One MoE layer between `begin_layer` and `finish_layer`: its routing on the host, its demand and the slot
    window its compute reads."""

    topk: np.ndarray            # [T, k] expert ids
    demand: LayerDemand         # the shared layer sequence's step (experts, first wave, routing)
    lo: int                     # slot window [lo, hi) the compute reads; -1: waves path
    hi: int

    @property
    def layer(self) -> int:
        return self.demand.layer

    @property
    def experts(self) -> np.ndarray:
        return self.demand.experts


@dataclass
class LayerCut:
    """Where a captured decode step is cut, at MoE layer `layer`'s routing (engine/graphs.py): the tensors the
    host work between replays reads and the next segment computes from, all at fixed addresses in the graph's
    pool (kept alive here, so no later capture reuses them), and the layer's static CPU result (hybrid modes)."""

    layer: int
    top_k_index: torch.Tensor          # [T, k]
    router_out: tuple | None           # (router logits, router input) where a policy reads them
    hidden: torch.Tensor               # [T, H] the experts' input
    top_k_weights: torch.Tensor        # [T, k]
    cpu_result: StaticResult | None = None   # set by runtime.allocate_static, outside the capture


@dataclass
class HostTiming:
    """Host wall seconds of the offload runtime's own work, split by what the device does meanwhile (the
    simulator charges each part that way: docs/POLICIES.md, "The simulator"):
      before_s     per offloaded layer, from the routing sync's return until the layer's experts are issued (the
                   compute stream has drained up to the router: the device waits; in hybrid modes this includes the
                   CPU half); the engine's routing snapshot and cache work, the policy's `on_access`
      after_s      per offloaded layer, `finish_layer`: release, the policy's `on_layer_routed`, prefetch issue (the
                   layer computes meanwhile)
      iteration_s  per iteration, the policy's `on_iteration_start` and `on_iteration_end` with the cache's iteration
                   bracket (the device idles between iterations)"""

    layers: int = 0
    iterations: int = 0
    before_s: float = 0.0
    after_s: float = 0.0
    iteration_s: float = 0.0

    def report(self) -> dict:
        per_layer, per_it = max(self.layers, 1), max(self.iterations, 1)
        return {"host_before_compute_ms_per_layer": 1e3 * self.before_s / per_layer,
                "host_after_compute_ms_per_layer": 1e3 * self.after_s / per_layer,
                "host_policy_ms_per_iteration": 1e3 * self.iteration_s / per_it}


@dataclass
class RuntimeTotals:
    hits: np.ndarray          # [L]
    misses: np.ndarray        # [L]
    bytes_copied: int = 0
    stall_s: float = 0.0
    iterations: int = 0
    cpu_experts: int = 0      # missed experts computed on the CPU (counted in misses too)
    host: HostTiming = field(default_factory=HostTiming)
    extra: dict = field(default_factory=dict)

"""Replay a routing trace through a registered policy and the engine's own ExpertCache.

Requests run one after another (batch size 1), in trace order. Every callback happens in the order
the engine makes it (engine/batch.py, engine/runtime.py):
  on_request_start
  per iteration: on_iteration_start -> enqueue, pump(-1)
    per MoE layer: on_access; cache.acquire (demand; waves of `capacity` experts when the layer needs
      more); cache.release; on_layer_routed -> enqueue, pump(layer); then the layer's compute time
    on_iteration_end; cache.end_iteration
  on_request_end
With bandwidth=inf the timed transport completes every copy at once, like the CPU engine, and the
hit/miss/byte counts equal the engine's on the same trace and budget.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from finemoe.config import EngineConfig
from finemoe.engine.engine import capacity_for
from finemoe.engine.metrics import RequestMetrics, aggregate
from finemoe.errors import FineMoEError
from finemoe.experts.cache import ExpertCache
from finemoe.models.adapters import ExpertGeometry
from finemoe.policies import create_policy, get_policy_class
from finemoe.policies.base import IterationInfo, LayerRouting, Policy, PolicyContext, RequestInfo
from finemoe.simulator.transport import CostModel, TimedTransport
from finemoe.traces.format import Trace


class SimulationError(FineMoEError):
    """The trace cannot drive this policy (it needs the model, or data the trace lacks)."""


@dataclass
class _Routed:
    """One trace, pre-cut for replay: int64 ids and each row's distinct experts sorted."""

    topk: np.ndarray           # [N, L, k] int64, router order
    sorted_topk: np.ndarray    # [N, L, k] int64, ascending (a 1-token iteration's np.unique)
    ones: np.ndarray           # [k] int64 counts of a 1-token iteration

    @staticmethod
    def of(trace: Trace) -> "_Routed":
        topk = trace.topk.astype(np.int64)
        return _Routed(topk, np.sort(topk, axis=-1), np.ones(trace.top_k, np.int64))


def check_simulatable(trace: Trace, policy: str) -> None:
    cls = get_policy_class(policy)
    if cls.needs_hidden_states:
        raise SimulationError(
            f"policy {policy!r} applies later layers' routers to hidden states, which a routing trace does not "
            f"hold: it cannot be simulated; run it in the engine (finemoe generate --policy {policy})")
    if cls.needs_router_probs and not trace.has_probs:
        raise SimulationError(f"policy {policy!r} needs full router probabilities but trace {trace.source!r} was "
                              "recorded without them: re-record it with `finemoe trace` (probabilities on)")


class Replay:
    """One policy and one budget over one trace."""

    def __init__(self, trace: Trace, policy: str, expert_budget, cost: CostModel,
                 policy_options: dict | None = None, prefetch_inflight: int = 4,
                 routed: _Routed | None = None, embed=None) -> None:
        """`embed`: the recorded model's input-embedding module, for policies with a token-semantic signal."""
        check_simulatable(trace, policy)
        options = dict(policy_options or {})
        if policy == "oracle":
            options.setdefault("trace", trace)
        self.trace, self.cost = trace, cost
        self.routed = routed or _Routed.of(trace)
        self.g = ExpertGeometry(trace.num_layers, trace.num_experts, trace.top_k, cost.expert_bytes, {}, torch.float16)
        cfg = EngineConfig(device="cpu", expert_budget=expert_budget, policy=policy, show_progress=False,
                           prefetch_inflight=prefetch_inflight)
        self.policy = create_policy(policy, **options)
        self.all_resident = self.policy.keeps_all_resident
        self.capacity, self.budget_bytes = capacity_for(cfg, self.g, self.all_resident)
        self.transport = TimedTransport(self.capacity, cost)
        self.cache = ExpertCache(self.g.total_experts, self.g.num_experts, self.capacity, self.transport,
                                 self.policy, prefetch_inflight)
        self.policy.bind(PolicyContext(self.g, self.cache.view(), torch.device("cpu"), embed=embed, options=options))
        if self.all_resident:
            self.cache.load_all()
            self.transport.bytes_copied = 0
            self.transport.now = self.transport.engine_free   # serving starts once every expert is loaded
        # the base class's on_layer_routed returns no prefetch by contract: skip building its argument
        self.reports_routing = type(self.policy).on_layer_routed is not Policy.on_layer_routed
        self.iteration = 0
        self.metrics: list[RequestMetrics] = []

    def run(self) -> dict:
        t0 = time.perf_counter()
        for r in range(self.trace.num_requests):
            self.metrics.append(self._request(r))
        wall = time.perf_counter() - t0
        self.policy.close()
        row = aggregate(self.metrics)
        row.update({"policy": self.policy.name, "expert_budget_bytes": self.budget_bytes,
                    "cache_slots": self.capacity, "expert_bytes": self.cost.expert_bytes,
                    "prefetch_copies": self.cache.prefetch_copies, "wasted_prefetches": self.cache.wasted_prefetches,
                    "simulated_s": self.transport.now, "wall_s": wall,
                    "requests_per_s": self.trace.num_requests / wall if wall > 0 else float("inf")})
        return row

    def _request(self, r: int) -> RequestMetrics:
        info = RequestInfo(self.trace.request_ids[r], self.trace.prompt_ids(r), self.trace.prompt_texts[r])
        self.policy.on_request_start(info)
        m = RequestMetrics(t_submit=self.transport.now)
        for i in range(int(self.trace.iterations[r])):
            bytes_before = self.transport.bytes_copied
            hits, misses = self._iteration(r, i)
            m.hits += hits
            m.misses += misses
            m.bytes_copied += self.transport.bytes_copied - bytes_before
            m.stall_s += self.transport.drain_stall_seconds()
            m.on_token(self.transport.now)
        self.policy.on_request_end(info)
        return m

    def _iteration(self, r: int, i: int) -> tuple[int, int]:
        a, b = self.trace.iteration_rows(r, i)
        it = IterationInfo(self.iteration, [self.trace.request_ids[r]], [i],
                           torch.from_numpy(self.trace.token_ids[a:b].astype(np.int64)).view(1, -1), i == 0)
        self.iteration += 1
        self.cache.enqueue(self.policy.on_iteration_start(it))
        self.cache.pump(-1)
        rows = np.zeros(b - a, np.int64)
        hits = misses = 0
        for layer in range(self.g.num_layers):
            if b - a == 1:
                experts, counts = self.routed.sorted_topk[a, layer], self.routed.ones
            else:
                experts, counts = np.unique(self.routed.topk[a:b, layer], return_counts=True)
            if self.all_resident:
                hits += experts.size
                self.transport.advance(self.cost.layer_time_s)
                continue
            n_hit = self._layer(layer, experts, counts)
            hits += n_hit
            misses += experts.size - n_hit
            if self.reports_routing:
                self.cache.enqueue(self.policy.on_layer_routed(self._routing(layer, a, b, rows)))
            self.cache.pump(layer)
            self.transport.advance(self.cost.layer_time_s)
        self.policy.on_iteration_end(it)
        self.cache.end_iteration()
        return hits, misses

    def _layer(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> int:
        """on_access, then the demand path exactly as OffloadRuntime.run_layer takes it. Returns hits."""
        self.policy.on_access(layer, experts, counts)
        cap = self.capacity
        if experts.size <= cap:
            return self.cache.acquire_release(layer, experts)
        return sum(self.cache.acquire_release(layer, experts[start:start + cap])    # waves of `capacity` experts
                   for start in range(0, experts.size, cap))

    def _routing(self, layer: int, a: int, b: int, rows: np.ndarray) -> LayerRouting:
        probs = None
        if self.policy.needs_router_probs:
            probs = torch.from_numpy(self.trace.probs[a:b, layer].astype(np.float32))      # [T, J]
        return LayerRouting(layer, torch.from_numpy(self.routed.topk[a:b, layer]), rows, probs)   # top_k [T, k]


def simulate(trace: Trace, policies: list[str], budgets: list, cost: CostModel,
             policy_options: dict[str, dict] | None = None, prefetch_inflight: int = 4) -> list[dict]:
    """One result row per (policy, budget), in that order. `policy_options` maps policy name -> options."""
    for p in policies:
        check_simulatable(trace, p)
    routed = _Routed.of(trace)
    rows = []
    for p in policies:
        for b in budgets:
            opts = (policy_options or {}).get(p, {})
            rows.append(Replay(trace, p, b, cost, opts, prefetch_inflight, routed).run())
    return rows

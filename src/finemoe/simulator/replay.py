"""Replay a routing trace through a registered policy and the engine's own ExpertCache.

Requests run one after another (batch size 1), in trace order. Every callback happens in the order
the engine makes it (engine/batch.py, engine/runtime.py):
  on_request_start
  per iteration: on_iteration_start -> cache.begin_iteration (queue, after the CPU-computed experts' copies, and pump)
    per MoE layer: the engine's own layer sequence (engine/layer_sequence.py) over the timed transport
      and a simulated clock; one-token decode iterations of a policy with compiled callbacks run it compiled
      (decode_loop.py)
    on_iteration_end; cache.end_iteration
  on_request_end
With bandwidth=inf the timed transport completes every copy at once, like the CPU engine, and the
hit/miss/byte counts equal the engine's on the same trace and budget. With `miss_compute` cpu|auto each layer's
misses are split as the engine splits them (LayerSequence.begin, experts/miss_split.py); the CPU half's time runs
beside the device half's copies (simulator/transport.py says how it is charged).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from finemoe.config import EngineConfig, capacity_for
from finemoe.engine.layer_sequence import LayerSequence
from finemoe.engine.metrics import RequestMetrics, aggregate
from finemoe.errors import FineMoEError
from finemoe.experts.cache import ExpertCache
from finemoe.experts.miss_split import GPU, MissCosts, mode_code
from finemoe.experts.prefetch_issue import INFLIGHT, PrefetchIssue
from finemoe.models.adapters import ExpertGeometry
from finemoe.policies import create_policy, get_policy_class
from finemoe.policies.base import IterationInfo, LayerRouting, Policy, PolicyContext, RequestInfo
from finemoe.simulator.decode_loop import MissPlan, decode_layers
from finemoe.simulator.transport import CostModel, SimulatedClock, TimedTransport
from finemoe.traces.format import Trace


class SimulationError(FineMoEError):
    """The trace cannot drive this policy (it needs the model, or data the trace lacks)."""


@dataclass
class Routed:
    """One trace, pre-cut for replay: int64 ids and each row's distinct experts sorted."""

    topk: np.ndarray           # [N, L, k] int64, router order
    sorted_topk: np.ndarray    # [N, L, k] int64, ascending (a 1-token iteration's np.unique)
    ones: np.ndarray           # [k] int64 counts of a 1-token iteration
    layer_base: np.ndarray     # [L, 1] int64 first flat key of each layer

    @staticmethod
    def of(trace: Trace) -> Routed:
        topk = trace.topk.astype(np.int64)
        return Routed(topk, np.sort(topk, axis=-1), np.ones(trace.top_k, np.int64),
                       (np.arange(trace.num_layers, dtype=np.int64) * trace.num_experts)[:, None])


def check_simulatable(trace: Trace, policy: str | type[Policy]) -> None:
    cls = get_policy_class(policy) if isinstance(policy, str) else policy
    policy = cls.name
    if cls.needs_hidden_states:
        raise SimulationError(
            f"policy {policy!r} applies later layers' routers to hidden states, which a routing trace does not "
            f"hold: it cannot be simulated; run it in the engine (finemoe generate --policy {policy})")
    if cls.needs_router_probs and not trace.has_probs:
        raise SimulationError(f"policy {policy!r} needs full router probabilities but trace {trace.source!r} was "
                              "recorded without them: re-record it with `finemoe trace` (probabilities on)")


class Replay:
    """One policy and one budget over one trace."""

    def __init__(self, trace: Trace, policy: str | Policy, expert_budget, cost: CostModel,
                 policy_options: dict | None = None, prefetch_inflight: int = 4,
                 routed: Routed | None = None, embed=None, miss_compute: str = "gpu",
                 miss_costs: MissCosts | None = None, issue: PrefetchIssue = INFLIGHT) -> None:
        """`policy`: a registered name (built with `policy_options`), or a policy instance not yet bound.
        `embed`: the recorded model's input-embedding module, for policies with a token-semantic signal.
        `miss_compute`: gpu | cpu | auto (experts/miss_split.py); `miss_costs`: what the split and the CPU half
        are charged by (default: cost.miss_costs; give the engine's own to replay its splits exactly)."""
        check_simulatable(trace, policy if isinstance(policy, str) else type(policy))
        options = dict(policy_options or {})
        if policy == "oracle":
            options.setdefault("trace", trace)
        self.trace, self.cost = trace, cost
        self.routed = routed or Routed.of(trace)
        self.g = ExpertGeometry(trace.num_layers, trace.num_experts, trace.top_k, cost.expert_bytes, {}, torch.float16)
        self.policy = create_policy(policy, **options) if isinstance(policy, str) else policy
        cfg = EngineConfig(device="cpu", expert_budget=expert_budget, policy=self.policy.name, show_progress=False,
                           prefetch_inflight=prefetch_inflight)
        self.all_resident = self.policy.keeps_all_resident
        self.capacity, self.budget_bytes = capacity_for(cfg, self.g, self.all_resident)
        self.transport = TimedTransport(self.capacity, cost)
        self.cache = ExpertCache(self.g.total_experts, self.g.num_experts, self.capacity, self.transport,
                                 self.policy, prefetch_inflight, issue)
        self.policy.bind(PolicyContext(self.g, self.cache.view(), torch.device("cpu"), embed=embed, options=options))
        if self.all_resident:
            self.cache.load_all()
            self.transport.bytes_copied = 0
            self.transport.now = self.transport.engine_free   # serving starts once every expert is loaded
        # the base class's on_layer_routed returns no prefetch by contract: skip building its argument
        self.reports_routing = type(self.policy).on_layer_routed is not Policy.on_layer_routed
        self.token_ids = trace.token_ids.astype(np.int64)                       # [N] for IterationInfo.input_ids
        self.sequence = LayerSequence(self.cache, self.policy, SimulatedClock(self.transport, cost.host_layer_s,
                                                                              self._step_s))
        L, J = trace.num_layers, trace.num_experts
        self.no_probs = np.zeros((L, 0), np.float32)                            # [L, 0] for a policy reading none
        self.prefetch_out = (np.zeros(L * J, np.int64), np.zeros(L * J))        # a compiled `routed`'s prefetch
        self.miss_mode = GPU if self.all_resident else mode_code(miss_compute)
        self.miss_costs = miss_costs or cost.miss_costs
        self.miss_plan = MissPlan.of(self.miss_mode, self.miss_costs, trace.top_k)
        self.bound_loops: dict = {}     # decode_layers' compiled wrappers bound to this replay's argument types
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
                    "cpu_wait_s": self.transport.cpu_wait, "simulated_s": self.transport.now, "wall_s": wall,
                    "requests_per_s": self.trace.num_requests / wall if wall > 0 else float("inf")})
        return row

    def _request(self, r: int) -> RequestMetrics:
        info = RequestInfo(self.trace.request_ids[r], self.trace.prompt_ids(r), self.trace.prompt_texts[r])
        self.policy.on_request_start(info)
        transport = self.transport
        m = RequestMetrics(t_submit=transport.now)
        for i in range(int(self.trace.iterations[r])):
            bytes_before = transport.bytes_copied
            hits, misses, cpu = self._iteration(r, i)
            m.hits += hits
            m.misses += misses
            m.cpu_experts += cpu
            m.bytes_copied += transport.bytes_copied - bytes_before
            m.stall_s += transport.drain_stall_seconds()
            m.on_token(transport.now)
        self.policy.on_request_end(info)
        return m

    def _iteration(self, r: int, i: int) -> tuple[int, int, int]:
        a, b = self.trace.iteration_rows(r, i)
        input_ids = torch.from_numpy(self.token_ids[a:b].reshape(1, -1))                         # [1, T]
        it = IterationInfo(self.iteration, [self.trace.request_ids[r]], [i], input_ids, i == 0)
        self.iteration += 1
        cache, policy = self.cache, self.policy
        if not self.all_resident:        # the policy's iteration work, the device idle (resident: none, as per layer)
            self.transport.advance(self.cost.policy_iteration_s)
        cache.begin_iteration(policy.on_iteration_start(it))
        probs = (self.trace.probs[a:b].astype(np.float32)                                     # [T, L, J]
                 if self.reports_routing and policy.needs_router_probs else None)
        token = None if probs is None else probs[0]                                            # [L, J]
        # a decode iteration's layers in one compiled call where the policy offers its callbacks compiled (and the
        # token's experts fit the cache: otherwise a layer runs in waves)
        looped = b - a == 1 and not self.all_resident and self.g.top_k <= self.capacity
        kernels = policy.decode_kernels(token) if looped else None
        if kernels is not None:
            routed = self.routed
            hits, misses, cpu = decode_layers(self.sequence, kernels, routed.sorted_topk[a], routed.topk[a],
                                              self.no_probs if token is None else token, routed.ones,
                                              self.prefetch_out, self.miss_plan, self.bound_loops)
        else:
            if b - a == 1:   # decode: one token, its k distinct experts (sorted) once each
                layers = zip(range(self.g.num_layers), self.routed.sorted_topk[a], repeat(self.routed.ones))
            else:
                layers = self._distinct_per_layer(a, b)
            hits, misses, cpu = self._layers(layers, a, b, probs)
        policy.on_iteration_end(it)
        cache.end_iteration()
        return hits, misses, cpu

    @property
    def _step_s(self) -> float:
        """Simulated time from a layer's compute start to the next layer's: the host's policy work overlaps it."""
        return max(self.cost.layer_time_s, self.cost.policy_layer_s)

    def _distinct_per_layer(self, a: int, b: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(layer, distinct experts ascending, tokens per expert) of token rows a..b, as np.unique per layer
        gives them, from one np.unique over flat keys (key order is layer order)."""
        J = self.g.num_experts
        keys, counts = np.unique(self.routed.topk[a:b] + self.routed.layer_base, return_counts=True)   # [n]
        bounds = keys.searchsorted(np.arange(self.g.num_layers + 1) * J).tolist()
        return [(layer, keys[lo:hi] - layer * J, counts[lo:hi])
                for layer, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]

    def _layers(self, layers, a: int, b: int, probs: np.ndarray | None) -> tuple[int, int, int]:
        """Every MoE layer of one iteration through the engine's layer sequence (begin; the waves when a layer
        needs more experts than slots; the CPU half's wait; finish), the compute being the clock's step. Returns
        (hits, misses, CPU-computed experts)."""
        hits = misses = cpu = 0
        if self.all_resident:
            for _, experts, _ in layers:
                hits += experts.size
                self.transport.now += self.cost.layer_time_s
            return hits, misses, cpu
        sequence, routing, transport = self.sequence, self.reports_routing, self.transport
        mode, costs = self.miss_mode, self.miss_costs
        rows = np.zeros(b - a, np.int64) if routing else None                 # [T] every token is batch row 0
        topk = self.routed.topk[a:b]                                          # [T, L, k]
        for layer, experts, counts in layers:
            seen = (LayerRouting(layer, topk[:, layer], rows, None if probs is None else probs[:, layer])
                    if routing else None)                                     # top_k [T, k], probs [T, J] views
            step = sequence.begin(layer, experts, counts, seen, mode, costs)
            if step.res is None:
                sequence.waves(step)
            if step.cpu.size:    # the CPU half ran on the host beside the device half's copies; then the compute
                transport.cpu_half(costs.cpu_time(counts[np.searchsorted(experts, step.cpu)]))
                cpu += step.cpu.size
            sequence.finish(step)
            n_hit = int(step.hit.sum())
            hits += n_hit
            misses += experts.size - n_hit
        return hits, misses, cpu


def simulate(trace: Trace, policies: list[str], budgets: list, cost: CostModel,
             policy_options: dict[str, dict] | None = None, prefetch_inflight: int = 4,
             miss_compute: str = "gpu", miss_costs: MissCosts | None = None, embed=None,
             issue: PrefetchIssue = INFLIGHT) -> list[dict]:
    """One result row per (policy, budget), in that order. `policy_options` maps policy name -> options;
    `miss_compute`, `miss_costs`, `embed` and `issue` as Replay takes them."""
    mode_code(miss_compute)
    for p in policies:
        check_simulatable(trace, p)
    routed = Routed.of(trace)
    rows = []
    for p in policies:
        for b in budgets:
            opts = (policy_options or {}).get(p, {})
            rows.append(Replay(trace, p, b, cost, opts, prefetch_inflight, routed, embed, miss_compute,
                               miss_costs, issue).run())
    return rows

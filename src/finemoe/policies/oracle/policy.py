"""The clairvoyant bound: prefetch exactly what the recorded future needs, evict by Belady."""
from __future__ import annotations

import numpy as np

from finemoe.errors import ConfigError
from finemoe.policies.base import (EvictionRank, IterationInfo, LayerKernels, LayerRouting, Policy, PolicyContext,
                                   Prefetch, RequestInfo, register_policy)
from finemoe.policies.oracle import belady
from finemoe.policies.oracle.belady import Order, Plan, StepState, oracle_access, oracle_routed
from finemoe.policies.oracle.future import FutureIndex
from finemoe.traces.format import Trace, load_trace


@register_policy
class OraclePolicy(Policy):
    name = "oracle"
    gate_values_keys = True      # the gate is minus each key's next use (belady.py): sooner = more valuable
    description = (
        "Clairvoyant bound (Belady 1966, with prefetching): fed a recorded trace of the same requests "
        "(option trace=PATH; requests matched by prompt token ids, later trace requests assumed to follow in "
        "trace order), it prefetches the experts the rest of the iteration needs in need order, never evicting "
        "for a prefetch anything needed sooner than what it fetches, and on a miss evicts the expert whose next "
        "use is farthest away (prefetch=false: demand-only Belady, the fewest copies). Exact at batch "
        "size 1 in trace order; in a larger batch each row looks at its "
        "own future. Prefetches cannot cross an iteration boundary (the engine drops them at iteration end).")

    def __init__(self, trace: str | Trace | None = None, lookahead: int | None = None, prefetch: bool = True) -> None:
        if trace is None:
            raise ConfigError("oracle needs the recorded routing of the same requests: pass --policy-option "
                              "trace=PATH (record it with `finemoe trace`)")
        self.trace = trace if isinstance(trace, Trace) else load_trace(str(trace))
        self.lookahead = lookahead
        self.prefetch = bool(prefetch)

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        if (self.trace.num_layers, self.trace.num_experts) != (g.num_layers, g.num_experts):
            raise ConfigError(f"oracle: trace {self.trace.source or self.trace.model!r} has {self.trace.num_layers} "
                              f"layers x {self.trace.num_experts} experts but the model has {g.num_layers} x "
                              f"{g.num_experts}: record a trace of this model")
        self.future = FutureIndex(self.trace)
        K = self.future.K
        self.lookahead = int(self.lookahead or g.num_layers)
        self.of_request: dict[str, int] = {}
        self.order = Order(layer=np.array([-1]), step=np.zeros(1, np.int64), has_order=np.zeros(1, bool),
                           ranked=np.zeros(1, bool), horizon=np.array([np.inf]), neg_next=np.full(K, -np.inf),
                           limit=np.array([np.inf]))
        self.plan = Plan(ctx.cache.resident, g.num_layers, self.lookahead, self.prefetch)
        self._marks = np.zeros(K, bool)            # needed_after's scratch
        self.state = self._state_of([])
        self.offsets: list[int] | None = None      # the rows' steps relative to the first row's, last iteration
        self._keys, self._prio = np.zeros(K, np.int64), np.zeros(K)   # a prefetch's buffers
        self._no_probs, self._no_aux = np.zeros(0, np.float32), np.zeros((g.num_layers, 0), np.float32)
        belady.warm_up()                          # compiled (or loaded) now, not in the first request

    def _state_of(self, bases: list[int]) -> StepState:
        """The kernels' state for an iteration of on-trace rows starting at steps `bases`."""
        return StepState(self.order, self.future.timeline, self.plan, np.asarray(bases, np.int64), self._marks)

    def on_request_start(self, req: RequestInfo) -> None:
        r = self.future.match(req.prompt_ids)
        if r is None:
            raise ConfigError(f"oracle: request {req.request_id} (prompt of {len(req.prompt_ids)} tokens) is not in "
                              f"trace {self.trace.source!r}: record the same prompts with `finemoe trace`")
        self.of_request[req.request_id] = r

    def on_request_end(self, req: RequestInfo) -> None:
        self.of_request.pop(req.request_id, None)

    def on_iteration_start(self, it: IterationInfo) -> Prefetch:
        bases = []
        for rid, step in zip(it.request_ids, it.steps):
            r = self.of_request.get(rid)
            if r is not None and step < self.future.iterations[r]:     # on the trace
                bases.append(self.future.base[r] + step * self.future.L)
        offsets = [b - bases[0] for b in bases]
        if offsets != self.offsets:               # other rows: the order is recomputed (belady.sync_order)
            self.order.has_order[0] = False
            self.offsets = offsets
        self.state = self._state_of(bases)
        return self._prefetch_after(-1)

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        oracle_access(layer, experts, counts, self.state)

    def on_layer_routed(self, routing: LayerRouting) -> Prefetch:
        return self._prefetch_after(routing.layer)

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels:
        return LayerKernels(oracle_access, self.state, oracle_routed, self.state, self._no_aux)

    def _prefetch_after(self, layer: int) -> Prefetch:
        """Keys needed in layers layer+1 .. layer+lookahead of this iteration, soonest first (belady.needed_after)."""
        m = oracle_routed(layer, self._keys, self._no_probs, self._no_probs, self.state, self._keys, self._prio)
        return Prefetch.take(self._keys, self._prio, m)

    def eviction_rank(self) -> EvictionRank:
        """Belady's order as a live rank: the farthest next use (by any row of the iteration) first; a prefetch
        evicts only keys needed beyond its horizon. The kernels keep it current from now on."""
        self.order.ranked[0] = True
        belady.sync_order(int(self.order.layer[0]), self.state)
        return EvictionRank.of(self.order.neg_next, gate=self.order.neg_next, limit=self.order.limit)

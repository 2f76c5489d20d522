"""The clairvoyant bound: prefetch exactly what the recorded future needs, evict by Belady."""
from __future__ import annotations

import numpy as np

from finemoe.errors import ConfigError
from finemoe.policies import kernels, oracle_kernels as ok
from finemoe.policies.base import (EvictionRank, IterationInfo, LayerKernels, LayerRouting, Policy, PolicyContext,
                                   Prefetch, RequestInfo, register_policy)
from finemoe.policies.oracle_future import FutureIndex, iteration_needs
from finemoe.policies.oracle_kernels import HAS_ORDER, LAYER, RANKED
from finemoe.traces.format import Trace, load_trace

__all__ = ["FutureIndex", "OraclePolicy"]


@register_policy
class OraclePolicy(Policy):
    name = "oracle"
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
        self.row_base = np.zeros(0, np.int64)     # [B] step of layer 0 of this iteration per row; -1 off-trace
        self.single_base: int | None = None     # row_base of a batch of one on-trace row, else None
        # the order the kernels keep (oracle_kernels): pos = (layer, order step, has order, ranked)
        self.pos = np.array([-1, 0, 0, 0], np.int64)
        self.horizon = np.array([np.inf])          # [1] steps to the farthest key of the last prefetch
        self.neg_next = np.full(K, -np.inf)        # [K] -(next trace use of each key after the order step)
        self.control = np.array([np.inf, 1.0])     # the rank's (prefetch limit, valid)
        self.step_state: tuple | None = None       # oracle_kernels' state for a one-row on-trace iteration
        self.plan = (ctx.cache.resident, g.num_layers, self.lookahead, self.prefetch)
        self._keys, self._prio = np.zeros(K, np.int64), np.zeros(K)   # a prefetch's buffers
        self._no_probs, self._no_aux = np.zeros(0, np.float32), np.zeros((g.num_layers, 0), np.float32)
        kernels.warm_up()                         # compiled (or loaded) now, not in the first request
        ok.warm_up()

    def on_request_start(self, req: RequestInfo) -> None:
        r = self.future.match(req.prompt_ids)
        if r is None:
            raise ConfigError(f"oracle: request {req.request_id} (prompt of {len(req.prompt_ids)} tokens) is not in "
                              f"trace {self.trace.source!r}: record the same prompts with `finemoe trace`")
        self.of_request[req.request_id] = r

    def on_request_end(self, req: RequestInfo) -> None:
        self.of_request.pop(req.request_id, None)

    def on_iteration_start(self, it: IterationInfo) -> Prefetch:
        base = []
        for rid, step in zip(it.request_ids, it.steps):
            r = self.of_request.get(rid)
            on_trace = r is not None and step < self.future.iterations[r]
            base.append(self.future.base[r] + step * self.future.L if on_trace else -1)
        self.row_base = np.asarray(base, np.int64)
        self.single_base = int(base[0]) if len(base) == 1 and base[0] >= 0 else None
        self.step_state = None
        if self.single_base is not None:
            order = (self.pos, self.horizon, self.neg_next, self.control)
            needs = iteration_needs(self.future, self.single_base, with_previous=bool(self.pos[RANKED]))
            self.step_state = (order, needs, self.future.kernel_view, self.plan)
        else:
            self._sync_order()                    # a batch or an off-trace row: no valid Belady order
        return self._prefetch_after(-1)

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        if self.step_state is not None:
            ok.oracle_access(layer, experts, counts, self.step_state)
        else:
            self.pos[LAYER] = layer

    def on_layer_routed(self, routing: LayerRouting) -> Prefetch:
        return self._prefetch_after(routing.layer)

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels | None:
        if self.step_state is None:
            return None
        return LayerKernels(ok.oracle_access, self.step_state, ok.oracle_routed, self.step_state, self._no_aux)

    def _prefetch_after(self, layer: int) -> Prefetch:
        """Keys needed in layers layer+1 .. layer+lookahead of this iteration, soonest first."""
        if self.step_state is not None:           # one on-trace row: compiled
            m = ok.oracle_routed(layer, self._keys, self._no_probs, self._no_probs, self.step_state, self._keys,
                                 self._prio)
            return Prefetch(self._keys[:m].copy(), self._prio[:m].copy())
        self.pos[LAYER] = layer
        return self._needed_after(layer)

    def _needed_after(self, layer: int) -> Prefetch:
        """A batch's (or an off-trace row's) `_prefetch_after`; sets `horizon` (steps to the farthest key)."""
        if not self.prefetch:
            return Prefetch.empty()
        last = min(layer + self.lookahead, self.future.L - 1)
        bases = self.row_base[self.row_base >= 0].tolist() if last > layer else []
        if not bases:
            self.horizon[0] = 0.0
            return Prefetch.empty()
        soonest = np.full(self.future.K, np.inf)
        for b in bases:
            keys, steps = self.future.needs(b + layer + 1, b + last)
            row = soonest if len(bases) == 1 else np.full(self.future.K, np.inf)
            row[keys[::-1]] = (steps[::-1] - (b + layer)).astype(np.float64)   # reversed: the earliest use wins
            if row is not soonest:
                np.minimum(soonest, row, out=soonest)
        soonest[self.ctx.cache.resident] = np.inf
        keys = np.flatnonzero(np.isfinite(soonest))
        self.horizon[0] = float(soonest[keys].max()) if keys.size else 0.0
        return Prefetch(keys, -soonest[keys])

    def _distances(self, candidates: np.ndarray) -> np.ndarray:
        """Steps until each candidate is needed by any row of this iteration (inf: never)."""
        layer = int(self.pos[LAYER])
        dists = [self.future.distance_to_next_use(candidates, b + layer)
                 for b in self.row_base[self.row_base >= 0].tolist()]
        if len(dists) == 1:
            return dists[0]
        return np.minimum.reduce([np.full(candidates.size, np.inf)] + dists)

    def select_victims(self, candidates: np.ndarray, n: int, for_prefetch: bool) -> np.ndarray:
        dist = self._distances(candidates)
        order = (-dist).argsort(kind="stable")
        if for_prefetch:
            order = order[dist[order] > self.horizon[0]]
        return candidates[order[:n]]

    def eviction_rank(self) -> EvictionRank:
        """Belady's order as a live rank for a batch of one on-trace row (rank = -next use, updated as keys are
        used); any other batch marks it invalid and the cache falls back to `select_victims`."""
        self.pos[RANKED] = 1
        self._sync_order()
        return EvictionRank(self.neg_next, np.zeros_like(self.neg_next), self.control)

    def _sync_order(self) -> None:
        """Bring `neg_next` to the current step (oracle_kernels.sync_order); off the trace or in a batch the rank is
        not valid."""
        if self.step_state is None:
            self.control[1] = 0.0
            self.pos[HAS_ORDER] = 0
            return
        order, needs, future, _ = self.step_state
        ok.sync_order(self.single_base + int(self.pos[LAYER]), order, needs, future)

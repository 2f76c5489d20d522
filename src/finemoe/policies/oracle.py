"""The clairvoyant bound: prefetch exactly what the recorded future needs, evict by Belady."""
from __future__ import annotations

from collections import defaultdict, deque

import numpy as np

from finemoe.errors import ConfigError
from finemoe.policies import kernels
from finemoe.policies.base import (EvictionRank, IterationInfo, LayerRouting, Policy, PolicyContext, Prefetch,
                                   RequestInfo, register_policy)
from finemoe.traces.format import Trace, load_trace


class FutureIndex:
    """The trace as one timeline of steps, step = (request, iteration, layer) in trace order:
    step(r, i, l) = base[r] + i * L + l. Two sorted code arrays answer the oracle's questions:
      by_key  = key * S1 + step   -> next use of any key after a step (one searchsorted, vectorised)
      by_step = step * K + key    -> the keys a range of steps needs, in need order (next_by_step: when each of
                                     those uses' key is used next)."""

    def __init__(self, trace: Trace) -> None:
        L, J = trace.num_layers, trace.num_experts
        self.L, self.K = L, L * J
        iters = trace.iterations.astype(np.int64)
        self.base = np.concatenate([[0], np.cumsum(iters * L)])               # [R+1]
        self.iterations = iters
        self.S1 = int(self.base[-1]) + 1
        lengths = np.diff(trace.offsets)
        req = np.repeat(np.arange(trace.num_requests), lengths)               # [N] request of each token row
        pos = np.arange(trace.num_tokens) - trace.offsets[req]                # [N] position within the request
        it = np.maximum(pos - trace.prompt_lens[req] + 1, 0)                  # [N] iteration of each row
        step0 = self.base[req] + it * L                                       # [N] step of layer 0
        steps = step0[:, None, None] + np.arange(L)[None, :, None]            # [N, L, 1]
        keys = np.arange(L)[None, :, None] * J + trace.topk.astype(np.int64)  # [N, L, k]
        steps, keys = np.broadcast_arrays(steps, keys)
        self.by_key = np.unique(keys.ravel() * self.S1 + steps.ravel())        # [E] every use once, key-major
        self._by_key_end = np.append(self.by_key, self.K * self.S1)           # + a sentinel no key matches
        key_of, step_of = np.divmod(self.by_key, self.S1)                     # [E]
        after = np.full(self.by_key.size, np.inf)                             # [E] the same key's next use
        same = key_of[1:] == key_of[:-1]
        after[:-1][same] = step_of[1:][same]
        codes = step_of * self.K + key_of                                     # [E] the same uses, step-major codes
        order = np.argsort(codes)
        self.by_step = codes[order]
        self.next_by_step = after[order]                                      # [E] next use after each by_step use
        self.step_ptr = np.searchsorted(self.by_step // self.K, np.arange(self.S1 + 1))
        self.requests: dict[tuple, deque] = defaultdict(deque)
        self._trace = trace
        for r in range(trace.num_requests):
            self.requests[tuple(trace.prompt_ids(r))].append(r)

    def match(self, prompt_ids: list[int]) -> int | None:
        """Trace index of the next unused request with these prompt tokens (reused cyclically)."""
        q = self.requests.get(tuple(prompt_ids))
        if not q:
            return None
        r = q.popleft()
        q.append(r)
        return r

    def distance_to_next_use(self, keys: np.ndarray, step: int) -> np.ndarray:
        """Steps from `step` until each key is next used (strictly later); inf if never."""
        found = self._by_key_end[self.by_key.searchsorted(keys * self.S1 + step, side="right")]
        key, at = np.divmod(found, self.S1)
        return np.where(key == keys, at - step, np.inf)

    def next_use(self, keys: np.ndarray, step: int) -> np.ndarray:
        """The step at which each key is next used (strictly after `step`); inf if never."""
        return self.distance_to_next_use(keys, step) + step

    def needs(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, steps) used in steps first..last inclusive, in need order."""
        codes = self.by_step[self.step_ptr[first]:self.step_ptr[last + 1]]
        return codes % self.K, codes // self.K


class IterationNeeds:
    """What one on-trace row needs in its iteration of steps b .. b+L-1: every key at most once (a key
    belongs to one layer), in ascending key order (which is layer order), and when each is needed next."""

    def __init__(self, future: FutureIndex, b: int) -> None:
        lo, hi = future.step_ptr[b], future.step_ptr[b + future.L]
        codes = future.by_step[lo:hi]
        steps = codes // future.K
        self.keys = codes % future.K                                          # [n] ascending
        self.layer = (steps - b).astype(np.float64)                           # [n] layer of each key
        self.bounds = steps.searchsorted(np.arange(b, b + future.L + 1)).tolist()   # [L+1] first index per layer
        self.key_list = self.keys.tolist()
        self.next_use = future.next_by_step[lo:hi].tolist()                   # [n] next use after this one


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
        self.lookahead = int(self.lookahead or g.num_layers)
        self.of_request: dict[str, int] = {}
        self.row_base = np.zeros(0, np.int64)     # [B] step of layer 0 of this iteration per row; -1 off-trace
        self.layer = -1
        self.horizon = np.inf
        self.single_base: int | None = None     # row_base of a batch of one on-trace row, else None
        self.needs_now: IterationNeeds | None = None   # that row's needs in this iteration
        self.rank: EvictionRank | None = None
        self.neg_next = np.full(self.future.K, -np.inf)   # [K] -(next trace use of each key after `order_step`)
        self._neg_next = memoryview(self.neg_next)       # the same buffer, for scalar writes
        self.order_step: int | None = None
        self._keys, self._prio = np.zeros(self.future.K, np.int64), np.zeros(self.future.K)   # a prefetch's buffers
        kernels.warm_up()                         # compiled (or loaded) now, not in the first request

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
        self.needs_now = None if self.single_base is None else IterationNeeds(self.future, self.single_base)
        return self._prefetch_after(-1)

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.layer = layer
        if self.rank is not None:
            self._sync_order()

    def on_layer_routed(self, routing: LayerRouting) -> Prefetch:
        return self._prefetch_after(routing.layer)

    def _prefetch_after(self, layer: int) -> Prefetch:
        """Keys needed in layers layer+1 .. layer+lookahead of this iteration, soonest first."""
        self.layer = layer
        if self.rank is not None:
            self._sync_order()
        prefetch = self._needed_after(layer)
        self._refresh_limit()
        return prefetch

    def _refresh_limit(self) -> None:
        """A prefetch never evicts what is needed sooner than the farthest key it fetches: only keys whose next
        use lies beyond `order_step + horizon` (read at every eviction, so kept current with both)."""
        if self.rank is not None and self.order_step is not None:
            self.rank.set_prefetch_limit(-(self.order_step + self.horizon))

    def _needed_after(self, layer: int) -> Prefetch:
        """The prefetch of `_prefetch_after`; sets `horizon` (steps to the farthest key it fetches)."""
        if not self.prefetch:
            return Prefetch.empty()
        last = min(layer + self.lookahead, self.future.L - 1)
        need = self.needs_now
        if need is not None and last > layer:     # one row: each key once, at its layer's step (compiled)
            m, self.horizon = kernels.absent_needs(need.keys, need.layer, need.bounds[layer + 1], need.bounds[last + 1],
                                                   self.ctx.cache.resident, layer, self._keys, self._prio)
            return Prefetch(self._keys[:m].copy(), self._prio[:m].copy())
        bases = self.row_base[self.row_base >= 0].tolist() if last > layer else []
        if not bases:
            self.horizon = 0.0
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
        self.horizon = float(soonest[keys].max()) if keys.size else 0.0
        return Prefetch(keys, -soonest[keys])

    def _distances(self, candidates: np.ndarray) -> np.ndarray:
        """Steps until each candidate is needed by any row of this iteration (inf: never)."""
        dists = [self.future.distance_to_next_use(candidates, b + self.layer)
                 for b in self.row_base[self.row_base >= 0].tolist()]
        if len(dists) == 1:
            return dists[0]
        return np.minimum.reduce([np.full(candidates.size, np.inf)] + dists)

    def select_victims(self, candidates: np.ndarray, n: int, for_prefetch: bool) -> np.ndarray:
        dist = self._distances(candidates)
        order = (-dist).argsort(kind="stable")
        if for_prefetch:
            order = order[dist[order] > self.horizon]
        return candidates[order[:n]]

    def eviction_rank(self) -> EvictionRank:
        """Belady's order as a live rank for a batch of one on-trace row (rank = -next use, updated as keys are
        used); any other batch marks it invalid and the cache falls back to `select_victims`."""
        self.rank = EvictionRank.of(self.neg_next)
        self._sync_order()
        return self.rank

    def _sync_order(self) -> None:
        """Bring `neg_next` to the current step: one step on, only the keys the trace uses at that step change;
        any other move recomputes every key."""
        if self.single_base is None:
            self.rank.set_valid(False)
            self.order_step = None
            return
        step = self.single_base + self.layer
        if step == self.order_step:
            return
        if self.order_step is not None and step == self.order_step + 1:   # only the keys used at `step` change
            need, layer = self.needs_now, step - self.single_base
            if layer >= 0:
                lo, hi = need.bounds[layer], need.bounds[layer + 1]
                changed, after = need.key_list[lo:hi], need.next_use[lo:hi]
            else:
                keys = self.future.needs(step, step)[0]
                changed, after = keys.tolist(), self.future.next_use(keys, step).tolist()
            neg_next = self._neg_next
            for k, at in zip(changed, after):
                neg_next[k] = -at
        else:
            self.neg_next[:] = -self.future.next_use(np.arange(self.future.K), step)
            self.rank.set_valid(True)
        self.order_step = step
        self._refresh_limit()

"""MoE-Infinity-style prefetching: request-level expert activation matrices matched against past requests."""
from __future__ import annotations

import os

import numpy as np

from finemoe.errors import ConfigError
from finemoe.policies.base import (EvictionRank, IterationInfo, LayerKernels, LayerRouting, Policy, PolicyContext,
                                   Prefetch, RequestInfo, register_policy)
from finemoe.policies.moe_infinity import steps
from finemoe.policies.moe_infinity.collection import ActivationCollection
from finemoe.policies.moe_infinity.matching import add_layer_counts
from finemoe.policies.moe_infinity.steps import AccessState, Accessed, RoutedState, eam_access, eam_routed
from finemoe.policies.trackers import FrequencyTracker


@register_policy
class MoEInfinityPolicy(Policy):
    name = "moe-infinity"
    description = (
        "Follows MoE-Infinity (Xue et al., 2024): each request keeps an expert activation matrix (per layer, "
        "how many of its tokens each expert served so far). After every layer the matrix is matched (cosine) "
        "against a collection of past requests' matrices (capacity 1000, oldest replaced; loaded from and "
        "atomically saved to `collection`, and learnt online at each request end); the best match's most used "
        "experts of the next `prefetch_distance` layers are prefetched, priority = usage share / distance. "
        "Eviction is LFU over all requests; the value of holding an expert (its rank's gate) is its usage share "
        "in the latest match, so under --prefetch-issue idle a prefetch evicts only experts the match uses less. "
        "Simplified: MoE-Infinity's own cache priority and its multi-GPU "
        "I/O are not modelled.")
    needs_router_probs = False
    gate_values_keys = True

    def __init__(self, collection: str | None = None, capacity: int = 1000, learn: bool = True,
                 prefetch_distance: int = 2, per_layer: int | None = None) -> None:
        if capacity < 1 or prefetch_distance < 1 or (per_layer is not None and per_layer < 1):
            raise ConfigError("moe-infinity: capacity, prefetch_distance and per_layer must be >= 1")
        self.path, self.capacity, self.learn = collection, int(capacity), bool(learn)
        self.distance, self.per_layer = int(prefetch_distance), per_layer

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        self.L, self.J = g.num_layers, g.num_experts
        self.per_layer = self.per_layer or g.top_k
        self.freq = FrequencyTracker(g.total_experts, g.num_experts)
        self.collection = ActivationCollection(self.L, self.J, self.capacity)
        steps.warm_up()                           # compiled (or loaded) now, not in the first request
        if self.path and os.path.exists(self.path):
            self.collection.load(self.path)
        LJ, C = self.L * self.J, self.capacity
        self.eams: dict[str, np.ndarray] = {}                           # per request [L*J] float32 counts
        self.dots: dict[str, np.ndarray] = {}                           # per request [C] float64 eam . unit rows
        self.batch_eam = np.zeros((0, LJ), np.float32)                  # [B, L*J] rows of this iteration
        self.batch_dots = np.zeros((0, C))                              # [B, C]
        self.fresh = np.zeros(0, bool)                                  # [B] row's matrix is still all zero
        self.any_fresh = False
        self.rows: list[str] = []
        self.one_row: tuple[np.ndarray | None, bool] = (None, False)    # (token_rows, all of them row 0)
        self.accessed = Accessed(np.zeros(self.J, np.int64), np.zeros(self.J, np.int64), np.array([-1], np.int64),
                                 np.zeros(1, np.int64))                 # what on_access saw (steps.eam_access)
        self.access_state = AccessState(self.freq.state, self.accessed)
        self.routed_state: RoutedState | None = None                    # a one-row iteration's steps.eam_routed state
        self.taken = np.zeros(self.J, bool)                             # share_prefetch's scratch
        self.gate = np.zeros(LJ)                                        # [L*J] usage share in the latest match
        self._keys, self._prio = np.zeros(LJ, np.int64), np.zeros(LJ)   # a prefetch's buffers
        self._no_probs, self._no_aux = np.zeros(0, np.float32), np.zeros((self.L, 0), np.float32)

    # ---- request lifecycle ---------------------------------------------------------------------
    def on_request_start(self, req: RequestInfo) -> None:
        self.eams[req.request_id] = np.zeros(self.L * self.J, np.float32)
        self.dots[req.request_id] = np.zeros(self.capacity)

    def on_request_end(self, req: RequestInfo) -> None:
        eam = self.eams.pop(req.request_id, None)
        self.dots.pop(req.request_id, None)
        row = self.collection.add(eam) if eam is not None and self.learn else None
        if row is not None:      # row `row` changed: every live product with it
            column = self.collection.by_key[:, row]                         # [L*J] float64
            for r, e in self.eams.items():
                self.dots[r][row] = e @ column
            self.batch_dots[:, row] = self.batch_eam @ column

    def on_iteration_start(self, it: IterationInfo) -> Prefetch:
        self.rows = list(it.request_ids)
        B, LJ, C = len(self.rows), self.L * self.J, self.capacity
        if B == 1 and self.rows[0] in self.eams:      # one started request: its own arrays, counted in place
            r = self.rows[0]
            self.batch_eam, self.batch_dots = self.eams[r][None], self.dots[r][None]        # [1, L*J], [1, C] views
        else:
            zero_eam, zero_dots = np.zeros(LJ, np.float32), np.zeros(C)   # a request not started: no counts
            self.batch_eam = np.stack([self.eams.get(r, zero_eam) for r in self.rows] or [zero_eam])[:B]  # [B, L*J]
            self.batch_dots = np.stack([self.dots.get(r, zero_dots) for r in self.rows] or [zero_dots])[:B]  # [B, C]
        self.fresh = ~self.batch_eam.any(axis=1)                          # [B]
        self.any_fresh = bool(self.fresh.any())
        self.accessed.layer[0] = -1
        self.routed_state = None
        if B == 1:
            self.routed_state = RoutedState(self.accessed, self.J, self.batch_eam[0], self.batch_dots[0],
                                            self.collection.stored(), self.distance, self.per_layer, self.taken,
                                            self.gate)
        return self._prefetch_after(-1)

    def on_iteration_end(self, it: IterationInfo) -> None:
        for b, r in enumerate(self.rows):
            if r in self.eams:
                self.eams[r], self.dots[r] = self.batch_eam[b], self.batch_dots[b]

    # ---- per layer -----------------------------------------------------------------------------
    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        eam_access(layer, experts, counts.astype(np.int64, copy=False), self.access_state)

    def on_layer_routed(self, routing: LayerRouting) -> Prefetch:
        layer, acc = routing.layer, self.accessed
        if self.batch_eam.shape[0]:
            one_row = (self.routed_state is not None and acc.layer[0] == layer
                       and self._only_row_zero(routing.token_rows))          # on_access's counts are the row's
            if one_row and self.any_fresh and acc.size[0]:
                self.fresh[0] = False
                self.any_fresh = False
            if one_row and not self.any_fresh:
                n = eam_routed(layer, acc.experts, self._no_probs, self._no_probs, self.routed_state, self._keys,
                               self._prio)
                return Prefetch.take(self._keys, self._prio, n)
            if not one_row:
                self._count_rows(layer, routing.top_k_on_host(), routing.token_rows)
        acc.layer[0] = -1
        return self._prefetch_after(layer)

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels | None:
        """A one-request iteration whose matrix has counts: steps.eam_access / eam_routed."""
        if self.routed_state is None or self.any_fresh:
            return None
        return LayerKernels(eam_access, self.access_state, eam_routed, self.routed_state, self._no_aux)

    def _only_row_zero(self, token_rows: np.ndarray) -> bool:
        """Every token belongs to batch row 0 (no padding): on_access's counts are that row's. Cached per
        iteration (the runtime hands the same token_rows array to every layer of an iteration)."""
        if self.one_row[0] is not token_rows:
            self.one_row = (token_rows, token_rows.size > 0 and not token_rows.any())
        return self.one_row[1]

    def _count_rows(self, layer: int, topk: np.ndarray, token_rows: np.ndarray) -> None:
        """topk [T, k], token_rows [T] (-1 padding): add each row's per-expert token counts of `layer`."""
        B, J = self.batch_eam.shape[0], self.J
        rows = np.repeat(token_rows, topk.shape[1])                       # [T*k]
        valid = rows >= 0
        counts = np.bincount(rows[valid] * J + topk.reshape(-1)[valid], minlength=B * J).reshape(B, J)  # [B, J]
        add_layer_counts(layer, counts, self.batch_eam, self.batch_dots, self.collection.by_key, self.collection.size)
        if self.any_fresh:
            self.fresh[rows[valid]] = False
            self.any_fresh = bool(self.fresh.any())

    def _prefetch_after(self, layer: int) -> Prefetch:
        B = self.batch_eam.shape[0]
        if layer + 1 >= self.L or B == 0:
            return Prefetch.empty()
        best = self.collection.best(self.batch_eam, self.batch_dots, self.fresh)
        if best is None:
            return Prefetch.empty()
        if B > 1:                                                          # union over the batch
            share = np.stack([self.collection.share_of(c) for c in best.tolist()]).max(axis=0)   # [L, J]
        else:
            share = self.collection.share_of(int(best[0]))
        self.gate[:] = share.reshape(-1)
        n = steps.share_prefetch(share, layer, self.distance, self.per_layer, self.taken, self._keys, self._prio)
        return Prefetch.take(self._keys, self._prio, n)

    def eviction_rank(self) -> EvictionRank:
        """LFU (then least recently used); gate: each key's usage share in the latest match."""
        return self.freq.rank(self.gate)

    def state_dict(self) -> dict:
        return {"collection": self.collection.unit[:self.collection.size].copy()}

    def save(self) -> bool:
        if not (self.path and self.learn):
            return False
        self.collection.save(self.path)
        return True

    def close(self) -> None:
        self.save()

"""The FineMoE policy (EuroSys'26, "Taming Latency-Memory Trade-Off in MoE-Based LLM Serving via
Fine-Grained Expert Offloading"): fine-grained expert maps in a deduplicated store, semantic and
trajectory search, delta-sized prefetches with priority p/(l - l_now), eviction by lowest p*freq.

Batches: every batch row is its own query (own embedding, own trajectory, own best map); a layer's
prefetch is the union of the rows' selections, each expert with its highest guiding probability.
Every row's iteration map is learned as its own store entry. A prefill row is represented by the
mean (default) or the last of its real tokens' router probabilities and embeddings (`prefill`).
Beyond the paper (docs/FINEMOE.md): `neighbors` (default 4; 1 = the paper), `window`, and the copy-bound admission
options `max_prefetch`, `cold_p` (admission.py; off by default).

The search runs inline, on the engine thread while the layer computes (the engine calls the policy once the layer's
compute is issued), in compiled kernels (planner.py) for every batch size and option; the store lives in host
memory as float32.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from finemoe.errors import ConfigError
from finemoe.policies.base import (EvictionRank, IterationInfo, LayerKernels, LayerRouting, Policy, PolicyContext,
                                   Prefetch, RequestInfo, register_policy)
from finemoe.policies.finemoe import eviction, planner
from finemoe.policies.finemoe.admission import PrefetchGate
from finemoe.policies.finemoe.embedding import SEMANTIC_MODES, make_embedder
from finemoe.policies.finemoe.eviction import EVICTION_RULES, EvictionScores, use_layer
from finemoe.policies.finemoe.map_store import MapStore, StoreSpec, model_identity
from finemoe.policies.finemoe.planner import SEARCH_MODES, IterationPlanner, routed_step
from finemoe.policies.finemoe.rows import RowQueries
from finemoe.policies.finemoe.search import SemanticMemo
from finemoe.policies.finemoe.selection import Selection

PREFILL_MODES = ("mean", "last")
SELECTION_RULES = ("delta", "topk")


def _choice(name: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ConfigError(f"finemoe option {name}={value!r} is not valid; use one of {', '.join(map(str, allowed))}")
    return value


@register_policy
class FineMoEPolicy(Policy):
    name = "finemoe"
    gate_values_keys = True      # the gate is each expert's latest guiding probability p (eviction.py)
    description = ("FineMoE: per-iteration expert maps (full router softmax of every layer) in a store with "
                   "RDY deduplication; semantic search guides the first d layers, trajectory search the rest; "
                   "prefetch the smallest top set with mass >= 1 - similarity (>= top-k) at priority p/(l - l_now); "
                   "evict the lowest p*freq.")
    needs_router_probs = True

    def __init__(self, map_store: str | None = None, learn: bool = True, fresh: bool = False,
                 capacity: int | None = None, prefetch_distance: int | None = None, semantic: str = "token",
                 search: str = "both", prefill: str = "mean", selection: str = "delta",
                 eviction: str = "pfreq", min_prefetch_prob: float = 0.0, neighbors: int = 4, window: int = 0,
                 max_prefetch: int = 0, cold_p: float = 0.0, embed: Any = None) -> None:
        self.path = map_store
        self.learn = bool(learn)
        self.fresh = bool(fresh)
        self.capacity = capacity
        self.distance = prefetch_distance
        self.semantic = _choice("semantic", semantic, SEMANTIC_MODES)
        self.search = _choice("search", search, SEARCH_MODES)
        self.prefill = _choice("prefill", prefill, PREFILL_MODES)
        self.selection = _choice("selection", selection, SELECTION_RULES)
        self.eviction = _choice("eviction", eviction, EVICTION_RULES)
        if self.semantic == "none" and self.search != "trajectory":
            raise ConfigError(f"finemoe option semantic='none' leaves nothing to search semantically: pass "
                              f"search='trajectory' with it (search={self.search!r} was given)")
        if not isinstance(min_prefetch_prob, (int, float)) or not 0.0 <= min_prefetch_prob <= 1.0:
            raise ConfigError(f"finemoe option min_prefetch_prob={min_prefetch_prob!r} must be a number in [0, 1]")
        self.floor = float(min_prefetch_prob)   # 0: faithful delta selection; > 0: skip unlikely extras
        self.gate = PrefetchGate(max_prefetch, cold_p)   # 0, 0 = the paper: every chosen expert, any victim
        self.embed_fallback = embed       # input-embedding callable for runs whose context has none (simulator)
        for name, v, low in (("capacity", capacity, 1), ("prefetch_distance", prefetch_distance, 1),
                             ("neighbors", neighbors, 1), ("window", window, 0)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise ConfigError(f"finemoe option {name}={v!r} must be an integer >= {low}")
        self.neighbors, self.window = neighbors, window   # the paper: neighbors=1 (its single best map), window=0
        self.critical_s = 0.0
        self.iterations = 0

    # ---- setup -----------------------------------------------------------------------------------
    def bind(self, ctx: PolicyContext) -> None:
        if ctx.embed is None and self.embed_fallback is not None:
            ctx = dataclasses.replace(ctx, embed=self.embed_fallback)
        super().bind(ctx)
        g = ctx.geometry
        self.L, self.J, self.top_k = g.num_layers, g.num_experts, g.top_k
        self.select = Selection(g.top_k, self.selection == "delta", self.floor)
        self.embedder = make_embedder(self.semantic, ctx)
        self.store = self._open_store(ctx)
        self.d = self.store.spec.distance
        self.scores = EvictionScores(g.total_experts, g.num_experts, self.eviction, cold_p=self.gate.cold_p)
        self.memo = SemanticMemo(self.store, self.neighbors)
        eviction.warm_up()                        # compiled (or loaded) now, not in the first request
        planner.warm_up()
        self.prompt_lens: dict[str, int] = {}
        self.planner: IterationPlanner | None = None
        self.queries = RowQueries(self.prefill)

    def _open_store(self, ctx: PolicyContext) -> MapStore:
        spec = StoreSpec(model_identity(ctx.geometry, ctx.model_name), self.L, self.J, self.embedder.dim,
                         self.semantic, self.distance if self.distance is not None else 3, self.capacity or 1000)
        return MapStore.open(self.path if not self.fresh else None, spec, self.distance is None, self.capacity is None)

    # ---- requests --------------------------------------------------------------------------------
    def on_request_start(self, req: RequestInfo) -> None:
        t0 = time.perf_counter()
        self.prompt_lens[req.request_id] = len(req.prompt_ids)
        self.embedder.request_start(req)
        self.critical_s += time.perf_counter() - t0

    def on_request_end(self, req: RequestInfo) -> None:
        self.prompt_lens.pop(req.request_id, None)
        self.embedder.request_end(req)

    # ---- the iteration ---------------------------------------------------------------------------
    def on_iteration_start(self, it: IterationInfo) -> Prefetch:
        t0 = time.perf_counter()
        self.iteration = it
        self.sem = None
        if self.learn:
            self._embed()                                                       # [B, E] host, stored at the end
        self.planner = IterationPlanner(self.store, len(it.request_ids), self.d, self.search, self.neighbors,
                                        self.window, self.learn, self.select, self.gate.max_per_layer,
                                        self.ctx.cache.resident, self.scores.state)
        keys = self._decode_token_ids_to_host(it) if self.semantic == "token" else None
        out = self.planner.begin(self._embed, self.memo, keys)
        self.critical_s += time.perf_counter() - t0
        return out

    def _embed(self) -> torch.Tensor:
        """The current iteration's semantic embeddings [B, E] (computed once per iteration)."""
        if self.sem is None:
            it = self.iteration
            lens = it.tokens or [self.prompt_lens.get(rid, it.input_ids.shape[1]) for rid in it.request_ids]
            self.sem = self.embedder.embed(it, lens, last_only=self.prefill == "last")
        return self.sem

    @staticmethod
    def _decode_token_ids_to_host(it: IterationInfo) -> list[int] | None:
        """HOST SYNC (decode only, [B] ids, the device idle between iterations): each row's token id, the
        memo key of its semantic search; None at prefill (rows are reduced over many tokens)."""
        if it.is_prefill:
            return None
        ids = it.input_ids
        return (ids.numpy()[:, -1] if ids.device.type == "cpu" else ids[:, -1]).tolist()

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        t0 = time.perf_counter()
        use_layer(layer, experts, counts, self.scores.state)
        self.critical_s += time.perf_counter() - t0

    def on_layer_routed(self, routing: LayerRouting) -> Prefetch:
        t0 = time.perf_counter()
        q = self.queries.of(routing, self.planner.batch, self.iterations)                          # [B, J] host
        out = self.planner.observe(routing.layer, q)
        self.critical_s += time.perf_counter() - t0
        return out

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels | None:
        """`on_access` and `on_layer_routed` of a one-row iteration as compiled functions (eviction.use_layer,
        planner.routed_step), with the store products of the iteration's routing probs [L, J] made in advance (the
        store is fixed until the iteration ends). Their host time is not counted in `critical_path_s`."""
        if probs is None or self.planner.batch != 1:
            return None
        return LayerKernels(use_layer, self.scores.state, routed_step, self.planner.state,
                            self.planner.products(probs))

    def on_iteration_end(self, it: IterationInfo) -> None:
        t0 = time.perf_counter()
        maps = self.planner.complete_maps() if self.learn else None
        if maps is not None:
            self.store.add_many(maps, self.sem, self.planner.map_dots())
        self.iterations += 1
        self.critical_s += time.perf_counter() - t0

    # ---- eviction, state, exit -------------------------------------------------------------------
    def eviction_rank(self) -> EvictionRank:
        """The eviction rule as live arrays (eviction.py); with cold_p a prefetch displaces only keys with p below
        it."""
        return self.scores.rank

    def state_dict(self) -> dict[str, Any]:
        return {"store_size": self.store.size, "store_capacity": self.store.spec.capacity,
                "store_replaced": self.store.replaced, "prefetch_distance": self.d,
                "critical_path_s": self.critical_s, "iterations": self.iterations,
                "critical_path_s_per_iteration": self.critical_s / max(self.iterations, 1)}

    def save(self) -> bool:
        if not (self.path and self.learn):
            return False
        self.store.save(self.path)
        return True

    def close(self) -> None:
        self.save()

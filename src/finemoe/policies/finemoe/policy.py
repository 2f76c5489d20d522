"""The FineMoE policy (EuroSys'26, "Taming Latency-Memory Trade-Off in MoE-Based LLM Serving via
Fine-Grained Expert Offloading"): fine-grained expert maps in a deduplicated store, semantic and
trajectory search, delta-sized prefetches with priority p/(l - l_now), eviction by lowest p*freq.

Batches: every batch row is its own query (own embedding, own trajectory, own best map); a layer's
prefetch is the union of the rows' selections, each expert with its highest guiding probability.
Every row's iteration map is learned as its own store entry. A prefill row is represented by the
mean (default) or the last of its real tokens' router probabilities and embeddings (`prefill`).
Beyond the paper (docs/FINEMOE.md): `neighbors` (default 4; 1 = the paper), `window`, and the copy-bound admission
options `max_prefetch`, `cold_p` (admission.py; off by default).
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
from finemoe.policies.finemoe import row_kernels, step_kernels, store_kernels
from finemoe.policies.finemoe.admission import PrefetchGate
from finemoe.policies.finemoe.embedding import SEMANTIC_MODES, make_embedder
from finemoe.policies.finemoe.map_store import DTYPES, MapStore, StoreSpec, model_identity
from finemoe.policies.finemoe.planner import SEARCH_MODES, IterationPlanner
from finemoe.policies.finemoe.rows import RowQueries
from finemoe.policies.finemoe.search import SemanticMemo
from finemoe.policies.finemoe.selection import EVICTION_RULES, EvictionScores, LayerPlan, Selection, merge
from finemoe.policies.finemoe.worker import DeferredWorker, InlineWorker, SearchWorker

PREFILL_MODES = ("mean", "last")
SELECTION_RULES = ("delta", "topk")


def _choice(name: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ConfigError(f"finemoe option {name}={value!r} is not valid; use one of {', '.join(map(str, allowed))}")
    return value


@register_policy
class FineMoEPolicy(Policy):
    name = "finemoe"
    description = ("FineMoE: per-iteration expert maps (full router softmax of every layer) in a store with "
                   "RDY deduplication; semantic search guides the first d layers, trajectory search the rest; "
                   "prefetch the smallest top set with mass >= 1 - similarity (>= top-k) at priority p/(l - l_now); "
                   "evict the lowest p*freq.")
    needs_router_probs = True

    def __init__(self, map_store: str | None = None, learn: bool = True, fresh: bool = False,
                 capacity: int | None = None, prefetch_distance: int | None = None, semantic: str = "token",
                 search: str = "both", prefill: str = "mean", store_dtype: str = "float32",
                 store_device: str = "cpu", async_search: str | bool = "auto", selection: str = "delta",
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
        self.store_dtype = DTYPES[_choice("store_dtype", store_dtype, tuple(DTYPES))]
        self.store_device = store_device
        self.async_search = _choice("async_search", async_search, ("auto", True, False, "deferred"))
        self.selection = _choice("selection", selection, SELECTION_RULES)
        self.eviction = _choice("eviction", eviction, EVICTION_RULES)
        if not isinstance(min_prefetch_prob, (int, float)) or not 0.0 <= min_prefetch_prob <= 1.0:
            raise ConfigError(f"finemoe option min_prefetch_prob={min_prefetch_prob!r} must be a number in [0, 1]")
        self.floor = float(min_prefetch_prob)   # 0: faithful delta selection; > 0: skip unlikely extras
        self.select: Selection | None = None
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
        self.scores = EvictionScores(g.total_experts, self.eviction)
        self.guide = self.scores.guide_arrays()   # the eviction p arrays for compiled plans (None: not compiled)
        self.access_state = self.scores.access_state(self.J)
        self.applied = False                      # this iteration's plans are made and applied in compiled calls
        # auto = inline: the engine calls the policy while the layer computes, so the search already runs beside
        # inference; a thread added GIL contention and late guides (docs/BENCHMARKS.md, runs 10-12)
        use_thread = False if self.async_search == "auto" else self.async_search
        self.worker = (DeferredWorker() if use_thread == "deferred" else SearchWorker() if use_thread
                       else InlineWorker())
        self.memo = SemanticMemo(self.store, self.neighbors)
        row_kernels.warm_up()                     # compiled (or loaded) now, not in the first request
        store_kernels.warm_up()
        step_kernels.warm_up()
        self.prompt_lens: dict[str, int] = {}
        self.planner: IterationPlanner | None = None
        self.queries = RowQueries(self.prefill)

    def _open_store(self, ctx: PolicyContext) -> MapStore:
        spec = StoreSpec(model_identity(ctx.geometry, ctx.model_name), self.L, self.J, self.embedder.dim,
                         self.semantic, self.distance if self.distance is not None else 3, self.capacity or 1000)
        return MapStore.open(self.path if not self.fresh else None, spec, self.distance is None, self.capacity is None,
                             self.store_device, self.store_dtype)

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
        self.worker.wait_idle()
        self.worker.drain()                       # guides of the previous iteration are stale
        self.iteration = it
        self.sem = None
        if self.learn:
            self._embed()                                                       # [B, E] host, stored at the end
        self.planner = IterationPlanner(self.store, len(it.request_ids), self.d, self.search, self.neighbors,
                                       self.window, keep_map_dots=self.learn)
        keys = self._decode_token_ids_to_host(it) if self.semantic == "token" else None
        self.applied = (self.planner.compiled(self.select) and type(self.worker) is InlineWorker
                        and self.guide is not None and self.gate.max_per_layer == 0)
        if self.applied:   # one compiled call makes, guides and prefetches the plans (the same as _to_prefetch)
            out = self.planner.begin_applied(self._embed, self.select, self.guide, self.memo, keys)
        else:
            out = self._to_prefetch(self.planner.begin_plans(self._embed, self.select, self.memo, keys), layer_now=-1)
        self.critical_s += time.perf_counter() - t0
        return out

    def _embed(self) -> torch.Tensor:
        """The current iteration's semantic embeddings [B, E] (computed once per iteration)."""
        if self.sem is None:
            it = self.iteration
            lens = [self.prompt_lens.get(rid, it.input_ids.shape[1]) for rid in it.request_ids]
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
        step_kernels.use_layer(layer, experts, counts, self.access_state)
        self.critical_s += time.perf_counter() - t0

    def on_layer_routed(self, routing: LayerRouting) -> Prefetch:
        t0 = time.perf_counter()
        planner, layer = self.planner, routing.layer
        if self.applied:   # the query is read before this call returns: no copy
            q = self.queries.of(routing, planner.batch, self.iterations, copy=False)                  # [1, J] host
            out = planner.observe_applied(layer, q, self.select, self.guide)
        else:
            q = self.queries.of(routing, planner.batch, self.iterations)                              # [B, J] host
            self.worker.submit(self._observe, (planner, layer, q))
            out = self._to_prefetch(self.worker.drain(), layer_now=layer)
        self.critical_s += time.perf_counter() - t0
        return out

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels | None:
        """On the compiled path (`applied`): `on_access` and `on_layer_routed` as step_kernels' functions, with the
        store products of the iteration's routing probs [L, J] made in advance (the store is fixed until the
        iteration ends). Their host time is not counted in `critical_path_s`."""
        if not self.applied or probs is None:
            return None
        planner = self.planner
        return LayerKernels(step_kernels.use_layer, self.access_state, step_kernels.routed_step,
                            planner.routed_state(self.select, self.guide), planner.products(probs))

    def on_iteration_end(self, it: IterationInfo) -> None:
        t0 = time.perf_counter()
        if self.learn:
            self.worker.submit(self._learn, (self.planner, self.sem))
        self.iterations += 1
        self.critical_s += time.perf_counter() - t0

    def _observe(self, job: tuple) -> LayerPlan | None:
        """Search job (worker thread or inline): layer `layer` routed -> the plan for layer + d, if any."""
        planner, layer, probs = job                                              # probs [B, J] host
        plan = planner.observe_plan(layer, probs, self.select)
        if self.eviction.startswith("ema"):
            self.scores.observed(layer, planner.observed[:, layer].max(0))
        return plan

    def _learn(self, job: tuple) -> None:
        planner, sem = job
        maps = planner.complete_maps()
        if maps is not None:
            self.store.add_many(maps, sem, planner.map_dots())

    def _to_prefetch(self, plans: list[LayerPlan], layer_now: int) -> Prefetch:
        """Plans still ahead of `layer_now` -> prefetches; their layers' eviction p is updated."""
        parts = []
        for plan in plans:
            if plan.layer <= layer_now:
                continue
            self.scores.guide(plan.layer, plan.row_p)
            parts.append(plan.prefetch(layer_now))
        return self.gate.limit(merge(parts), self.ctx.cache.resident)

    # ---- eviction, state, exit -------------------------------------------------------------------
    def select_victims(self, candidates: np.ndarray, n: int, for_prefetch: bool) -> np.ndarray:
        t0 = time.perf_counter()
        if for_prefetch:
            candidates = self.gate.displaceable(candidates, self.scores.p)
        out = self.scores.victims(candidates, n)
        self.critical_s += time.perf_counter() - t0
        return out

    def eviction_rank(self) -> EvictionRank | None:
        """The eviction rule as live arrays; with cold_p a prefetch's victims also need p < cold_p, which a rank
        cannot say: then `select_victims` decides."""
        return self.scores.rank if self.gate.cold_p == 0.0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"store_size": self.store.size, "store_capacity": self.store.spec.capacity,
                "store_replaced": self.store.replaced, "prefetch_distance": self.d,
                "critical_path_s": self.critical_s, "iterations": self.iterations,
                "critical_path_s_per_iteration": self.critical_s / max(self.iterations, 1)}

    def save(self) -> bool:
        if not (self.path and self.learn):
            return False
        self.worker.wait_idle()
        self.store.save(self.path)
        return True

    def close(self) -> None:
        self.worker.wait_idle()
        self.worker.stop()
        if self.path and self.learn:
            self.store.save(self.path)

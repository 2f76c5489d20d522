"""The offload runtime: what happens inside every MoE layer during a forward pass.

Per layer (the router has already chosen top-k experts on the device):
  1. `_sync_routing_to_host`: the one named host-device sync per layer; the host learns which experts
     the batch needs (skipped entirely when every expert is resident). Router probabilities, if the
     policy reads them, start copying to the host right away (snapshots.py), before any copy wait.
  2-4. The layer's host work (layer_sequence.py, shared with the simulator): the cache makes the experts
     resident (misses copied at once on the copy stream, ahead of every prefetch not yet issued; the
     compute stream waits only for those copies); the layer computes with transformers' own experts
     function over the slot pools; while it computes, the policy sees the routing and returns
     prefetches, which queue behind the demand copies.
If a batch needs more distinct experts than the cache has slots, the layer runs in waves, each wave's
rows computed separately and reduced once at the end, in the same order as the unmodified model.
With `--miss-compute cpu|auto` (`hybrid`) the layer's misses are split in step 2-4: the cache copies only the
device half, the CPU half runs on the host from the host store while the device copies (eager: and computes),
and its result is added to the layer's output (engine/cpu_misses.py). A CPU-computed expert counts as a miss
that copied 0 bytes. Under a captured decode graph (engine/graphs.py) the same host work runs between segment
replays (`begin_replayed_layer`), and each segment computes its layer with `captured_layer`.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from finemoe.engine.cpu_misses import CpuMisses, StaticResult, with_cpu_result
from finemoe.engine.layer_sequence import LayerSequence, RealClock
from finemoe.engine.snapshots import RouterSnapshots
from finemoe.engine.stats import (IterationStats, LayerCut, LayerStep, RuntimeTotals, count_layer_rows,
                                  distinct_experts)
from finemoe.engine.waves import run_in_waves
from finemoe.experts.cache import ExpertCache
from finemoe.experts.hook import SlotExperts
from finemoe.experts.miss_split import GPU, MissCosts
from finemoe.models.adapters import ExpertGeometry, MoELayer
from finemoe.policies.base import IterationInfo, LayerRouting, Policy


class LayerExecutor:
    """Attached to an experts module as `finemoe_layer`; called by the registered experts function."""

    def __init__(self, runtime: OffloadRuntime, layer: MoELayer, compute_fn, pools: dict[str, torch.Tensor]):
        self.runtime = runtime
        self.index = layer.index
        self.compute_fn = compute_fn
        self.module = layer.experts
        self.pools = pools

    def window(self, lo: int, hi: int) -> SlotExperts:
        """The experts module seen through slots [lo, hi) of the pools (views, no copy)."""
        return SlotExperts(self.module, {name: pool[lo:hi] for name, pool in self.pools.items()})

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return self.runtime.run_layer(self, hidden, top_k_index, top_k_weights)


DEAD_ROW = -2      # token_rows value of a finished row still computed by a fixed-size (graph) batch: its
                   # experts are not loaded for it; it reads whatever slots the table points at
MAX_GROUPS = 1024  # torch grouped_mm on CUDA accepts at most this many groups (slots) per call


class OffloadRuntime:
    max_groups = MAX_GROUPS  # tests lower it to exercise the windowed rows path on small models

    def __init__(self, geometry: ExpertGeometry, layers: list[MoELayer], cache: ExpertCache, policy: Policy,
                 device: torch.device, all_resident: bool, miss_mode: int = GPU, costs: MissCosts | None = None,
                 cpu_misses: CpuMisses | None = None, layer_devices: list[torch.device] | None = None) -> None:
        """miss_mode GPU | CPU | AUTO (experts/miss_split.py); costs and cpu_misses are needed unless GPU.
        layer_devices [L]: where each MoE layer computes (--non-expert-placement split); None: all on `device`."""
        self.g = geometry
        self.miss_mode = GPU if all_resident else miss_mode
        self.costs = costs
        self.cpu_misses = cpu_misses
        self.layers = layers
        self.cache = cache
        self.policy = policy
        self.device = device
        self.layer_devices = list(layer_devices or [device] * len(layers))
        self.all_resident = all_resident
        self.sequence = LayerSequence(cache, policy, RealClock())
        L, J = geometry.num_layers, geometry.num_experts
        pin = device.type == "cuda"
        self._lut_host = torch.zeros((L, J), dtype=torch.int64, pin_memory=pin)  # slot of each expert
        self._lut_np = self._lut_host.numpy()
        luts = {dev: self._lut_host.to(dev) if pin else self._lut_host for dev in set(self.layer_devices)}
        self._lut_rows = [luts[dev][i] for i, dev in enumerate(self.layer_devices)]   # [J] on each layer's device
        self.totals = RuntimeTotals(np.zeros(L, np.int64), np.zeros(L, np.int64))
        self._router_out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._snapshots = RouterSnapshots(L, device)
        self._hooks = []
        if policy.needs_router_probs or policy.needs_hidden_states:
            for layer in layers:
                self._hooks.append(layer.router.register_forward_hook(self._make_router_hook(layer.index)))
        self._it: IterationInfo | None = None
        self._token_rows = np.zeros(0, np.int64)
        self._live_tokens: np.ndarray | None = None   # [T] bool, None = every token is live
        self.capture = None                          # a SegmentedGraph while one is being recorded
        self.prefill_lookahead = False               # stream layer l+1's predicted experts during prefill
        self._lookahead = False
        self._row_hits = np.zeros(0, np.int64)
        self._row_misses = np.zeros(0, np.int64)
        self._row_cpu = np.zeros(0, np.int64)
        self._bytes_at_start = 0
        self._routed_at = 0.0                        # host clock when the current layer's routing sync returned
        self._resident_topk: list[tuple[int, torch.Tensor]] = []

    def _make_router_hook(self, index: int):
        def hook(module, args, output):
            self._router_out[index] = (output[0], args[0])
        return hook

    def route(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Apply MoE layer `layer`'s router to `hidden` [T, H] -> full probabilities [T, J] float32."""
        logits = self.layers[layer].router(hidden.to(self.layer_devices[layer]))[0]
        return torch.softmax(logits.float(), dim=-1)

    def mark_resident_all(self) -> None:
        """Load every expert; key = slot, so layer l's experts occupy slots [l*J, (l+1)*J) (see run_layer).
        Waits for the copies: the resident path never waits per layer, so they must have landed first."""
        self.cache.load_all()
        self.cache.transport.finish_all()

    # ---- iteration bracket ---------------------------------------------------------------------
    def begin_iteration(self, it: IterationInfo, token_rows: np.ndarray) -> None:
        self._it = it
        self._token_rows = token_rows
        dead = token_rows == DEAD_ROW
        self._live_tokens = ~dead if dead.any() else None
        self._lookahead = self.prefill_lookahead and it.is_prefill and not self.all_resident
        B = len(it.request_ids)
        self._row_hits = np.zeros(B, np.int64)
        self._row_misses = np.zeros(B, np.int64)
        self._row_cpu = np.zeros(B, np.int64)
        self._bytes_at_start = self.cache.transport.bytes_copied
        t0 = time.perf_counter()
        self.cache.begin_iteration(self.policy.on_iteration_start(it))
        self.totals.host.iteration_s += time.perf_counter() - t0

    def end_iteration(self) -> IterationStats:
        assert self._it is not None
        if self._resident_topk:
            self._count_resident_hits()
        stall = self.cache.transport.drain_stall_seconds()
        t0 = time.perf_counter()
        self.policy.on_iteration_end(self._it)
        self.cache.end_iteration()
        host = self.totals.host
        host.iteration_s += time.perf_counter() - t0
        host.iterations += 1
        copied = self.cache.transport.bytes_copied - self._bytes_at_start
        self.totals.bytes_copied += copied
        self.totals.stall_s += stall
        self.totals.iterations += 1
        self._it = None
        self._router_out.clear()
        return IterationStats(self._row_hits, self._row_misses, copied, stall, self._row_cpu)

    # ---- the per-layer path --------------------------------------------------------------------
    def run_layer(self, ex: LayerExecutor, hidden: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
        layer = ex.index
        if self.all_resident:  # layer l's experts sit in slots [l*J, (l+1)*J): no host work at all
            if self._it is not None or self.capture is not None:  # counted at iteration end (no sync now)
                self._resident_topk.append((layer, top_k_index))
            J = self.g.num_experts
            return ex.compute_fn(ex.window(layer * J, (layer + 1) * J), hidden, top_k_index, top_k_weights)
        if self.capture is not None:  # recording a CUDA graph: the host work runs between replays
            cut = LayerCut(layer, top_k_index, self._router_out.get(layer), hidden, top_k_weights)
            self.capture.cut(cut)
            return self.captured_layer(ex, cut)
        step = self.begin_layer(layer, top_k_index)
        if self._lookahead and layer + 1 < len(self.layers):
            self._look_ahead(layer + 1, hidden)
        job = None
        if step.demand.cpu.size:   # the CPU half's inputs start copying to the host before the device half
            job = self.cpu_misses.start(layer, step.demand.cpu, step.topk, self._live_tokens, hidden, top_k_weights)
        if step.lo < 0:            # (the CPU experts' rows are in no wave: they come out zero)
            out = run_in_waves(self, ex, hidden, top_k_index, top_k_weights, step.demand)
        else:
            weights = top_k_weights if job is None else self.cpu_misses.device_weights(layer, top_k_index,
                                                                                       top_k_weights)
            out = ex.compute_fn(ex.window(step.lo, step.hi), hidden, self._lut_rows[layer][top_k_index], weights)
        if job is not None:        # HOST SYNC: the CPU rows' inputs; the CPU computes while the GPU works
            out = with_cpu_result(out, self.cpu_misses.finish(job, torch.empty_like(out)))
        self.finish_layer(step)
        return out

    # ---- the captured path (engine/graphs.py) ---------------------------------------------------------
    def allocate_static(self, cut: LayerCut) -> None:
        """Outside any capture (between two segments' captures): the static device buffers that layer
        `cut.layer`'s segment reads besides the slot table; hybrid modes only (a zero CPU result [T, H])."""
        if self.miss_mode != GPU:
            cut.cpu_result = StaticResult(torch.zeros_like(cut.hidden))

    def captured_layer(self, ex: LayerExecutor, cut: LayerCut) -> torch.Tensor:
        """What a graph segment computes for layer `cut.layer`'s experts: the whole pool's window through the
        device slot table, and in hybrid modes the keep mask and the CPU result's add; every buffer it reads
        is at a fixed address and written between replays (`begin_replayed_layer`). `gpu` mode: the plain
        experts call, nothing else."""
        layer, weights = cut.layer, cut.top_k_weights
        if cut.cpu_result is not None:
            weights = self.cpu_misses.device_weights(layer, cut.top_k_index, weights)
        out = ex.compute_fn(ex.window(0, self.pool_size), cut.hidden, self._lut_rows[layer][cut.top_k_index],
                            weights)
        return out if cut.cpu_result is None else with_cpu_result(out, cut.cpu_result.out)

    def begin_replayed_layer(self, cut: LayerCut) -> LayerStep:
        """The host work between the segment that ends at layer `cut.layer`'s routing and the one that computes
        its experts: `begin_layer` (HOST SYNC: the routing; the device half's copies start), then in hybrid
        modes the CPU half run to completion into the segment's static buffers (HOST SYNC: its inputs), while
        the copies are in flight; the segment's replay, queued after, waits for them (their events)."""
        step = self.begin_layer(cut.layer, cut.top_k_index, cut.router_out)
        if step.lo != 0:
            raise RuntimeError(f"layer {cut.layer} needs {step.experts.size} experts at once, more than one graph "
                               "window holds; this batch size must run eagerly")
        if cut.cpu_result is not None:
            self.cpu_misses.run_static(cut.layer, step.demand.cpu, step.topk, self._live_tokens, cut.hidden,
                                       cut.top_k_weights, cut.cpu_result)
        return step

    @property
    def graph_ready(self) -> bool:
        """Whether a captured decode graph can run this runtime's layers: every layer's experts fit in one
        window of the whole pool (slot ids < MAX_GROUPS), which the caller must also check per batch size."""
        return self.all_resident or self.pool_size <= self.max_groups

    @property
    def pool_size(self) -> int:
        """Slots of the computing layer's device's pool: the cache's capacity on one device (several:
        experts/multi_device, the device of the layer whose demand was loaded last)."""
        return self.cache.transport.compute_pool_size(self.cache.capacity)

    def begin_layer(self, layer: int, top_k_index: torch.Tensor, router_out=None) -> LayerStep:
        """Host work before layer `layer`'s experts compute: learn the routing (one named sync), snapshot
        what the policy reads, make the experts resident (misses copy now, the compute stream waits for
        them) and point the device slot table at them. `lo < 0` in the result: the layer needs the waves
        path (eager only). `router_out`: the layer's (logits, router input) where no forward hook recorded
        them (graph replay)."""
        if router_out is not None:
            self._router_out[layer] = router_out
        topk = self._sync_routing_to_host(top_k_index)          # [T, k] numpy
        self._routed_at = time.perf_counter()
        need = topk if self._live_tokens is None else topk[self._live_tokens]
        experts, counts = distinct_experts(need, self.g.num_experts)
        routing = self._routing(layer, top_k_index)             # queued before any copy wait
        costs = self.cpu_misses.costs if self.cpu_misses is not None else self.costs
        demand = self.sequence.begin(layer, experts, counts, routing, self.miss_mode, costs)
        res, cap = demand.res, self.pool_size
        if res is None:
            return LayerStep(topk, demand, -1, -1)
        slots = self.cache.transport.compute_slots(res.slots)   # [n] in the compute pool (several devices: staged)
        if cap <= self.max_groups or slots.size == 0:
            lo, hi = 0, min(cap, self.max_groups)
        else:
            lo, hi = int(slots.min()), int(slots.max()) + 1
        if hi - lo > self.max_groups:
            return LayerStep(topk, demand, -1, -1)
        self._lut_np[layer, demand.experts] = slots - lo
        self._lut_np[layer, demand.cpu] = 0      # computed on the CPU: any slot of the window, at weight 0
        if self._lut_rows[layer].device.type == "cuda":
            self._lut_rows[layer].copy_(self._lut_host[layer], non_blocking=True)
        return LayerStep(topk, demand, lo, hi)

    def finish_layer(self, step: LayerStep) -> None:
        """Host work after layer `step.layer`'s experts compute was issued (every wave, on the waves path):
        release its slots (recording the last use), let the policy see the routing (prefetches queue behind
        demand), count hits. HOST SYNC: the router probabilities' snapshot, when the policy reads them.
        Times the host work since the routing sync and here (totals.host)."""
        t0 = time.perf_counter()
        if step.demand.routing.probs is not None:
            self._snapshots.wait(step.layer)
        self.sequence.finish(step.demand)
        self._record(step.layer, step.topk, step.experts, step.demand.hit, step.demand.cpu)
        host = self.totals.host
        host.before_s += t0 - self._routed_at
        host.after_s += time.perf_counter() - t0
        host.layers += 1

    def _look_ahead(self, layer: int, hidden: torch.Tensor) -> None:
        """Prefill lookahead: while this layer computes, start copying the experts that layer `layer`'s own
        router picks for these hidden states (most used first), behind this layer's demand copies. The
        router runs through `forward` directly, so no forward hook sees (or replaces) this guess.
        HOST SYNC: the predicted experts."""
        J = self.g.num_experts
        logits = self.layers[layer].router.forward(hidden.to(self.layer_devices[layer]))[0]   # [T, J]
        picks = torch.topk(logits.float(), self.g.top_k, dim=-1).indices.reshape(-1)   # [T*k]
        counts = torch.bincount(picks, minlength=J).cpu().numpy()                     # [J]  (syncs)
        order = np.argsort(-counts, kind="stable")[: int((counts > 0).sum())]
        self.cache.prefetch_now(layer * J + order)

    @staticmethod
    def _sync_routing_to_host(top_k_index: torch.Tensor) -> np.ndarray:
        """HOST SYNC (one per layer): copy the top-k expert ids to the host."""
        return top_k_index.to("cpu").numpy()

    def _routing(self, layer: int, top_k_index: torch.Tensor) -> LayerRouting:
        """What the policy will see of layer `layer`: router probabilities start copying to the host now
        (ready after `_snapshots.wait`), hidden states stay on the device."""
        probs = hidden = None
        if layer in self._router_out:
            logits, hidden_in = self._router_out.pop(layer)
            if self.policy.needs_router_probs:
                probs = self._snapshots.take(layer, torch.softmax(logits.float(), dim=-1))   # [T, J] host
            if self.policy.needs_hidden_states:
                hidden = hidden_in.reshape(-1, hidden_in.shape[-1])
        return LayerRouting(layer, top_k_index, self._token_rows, probs, hidden)

    # ---- metrics -------------------------------------------------------------------------------
    def _record(self, layer: int, topk: np.ndarray, experts: np.ndarray, hit: np.ndarray, cpu: np.ndarray) -> None:
        """experts [n] served by the device, hit [n]; cpu [m] missed experts computed on the CPU."""
        n_hit = int(hit.sum())
        self.totals.hits[layer] += n_hit
        self.totals.misses[layer] += experts.size - n_hit + cpu.size
        self.totals.cpu_experts += cpu.size
        if self._row_hits.size:
            count_layer_rows(self._token_rows, topk, experts, hit, cpu, self.g.num_experts, self._row_hits,
                             self._row_misses, self._row_cpu)

    def _count_resident_hits(self) -> None:
        """HOST SYNC (one per iteration, resident only): every layer's top-k ids in a single copy, counted
        for all layers at once (every use is a hit; distinct experts per layer, per row)."""
        layers = np.array([layer for layer, _ in self._resident_topk])
        stacked = torch.stack([idx for _, idx in self._resident_topk]).to("cpu").numpy()   # [n, T, k]
        self._resident_topk.clear()
        rows = self._token_rows
        if self._live_tokens is not None:
            stacked, rows = stacked[:, self._live_tokens], rows[self._live_tokens]
        n, T, k = stacked.shape
        J = self.g.num_experts
        lidx = np.repeat(np.arange(n), T * k)                                  # [n*T*k]
        flat = stacked.reshape(-1)
        distinct = np.zeros((n, J), dtype=bool)                                 # [n, J]
        distinct[lidx, flat] = True
        self.totals.hits[layers] += distinct.sum(1)
        B = self._row_hits.size
        row_of = np.tile(np.repeat(rows, k), n)                                 # [n*T*k]
        ok = row_of >= 0
        if B and ok.any():
            used = np.zeros((n, B, J), dtype=bool)                              # [n, B, J]
            used[lidx[ok], row_of[ok], flat[ok]] = True
            self._row_hits += used.sum((0, 2))

"""CUDA-graph capture of one decode step, cut at every MoE layer's routing.

With every expert resident the whole step is one graph: no host work at all between the input token
and the logits. With offloading the host must learn each layer's routing before that layer's experts
run (to copy the misses), so the step is recorded as L+1 graphs that share one memory pool:

    graph 0      embeddings .. layer 0 attention, router, top-k
    graph i+1    layer i experts (through the device slot table) .. layer i+1 router, top-k
    graph L      layer L-1 experts .. final norm, lm head

and replayed as `graph 0; for each layer: host work (runtime.begin_replayed_layer: one named sync, router
snapshot, demand copies, slot table; in hybrid modes the CPU half); graph i+1; runtime.finish_layer (release,
policy, prefetches)`. The graphs are replayed in the order they were captured, which is what lets them share a
pool. The experts of every layer read one fixed window of the whole slot pool through the slot table, so a
captured graph serves whatever experts are resident at replay time.

Each cut records a `LayerCut`: the tensors of the segment just closed that the host work reads (top-k ids,
router output, and the experts' input hidden states and weights, which the CPU half of a hybrid layer copies
to the host), kept alive so that no later capture reuses their memory. With `--miss-compute cpu|auto` segment
i+1 also captures layer i's keep mask and CPU-result add over static buffers (engine/cpu_misses.py): the keep
mask [L, J] is allocated with the runtime, the CPU result [T, H] between the two captures
(`runtime.allocate_static`, so it is an ordinary allocation, not in the pool, and no captured op zeroes it),
and both are written between replays on the compute stream, before the segment that reads them is queued.
`gpu` mode captures neither: its segments are the plain ones.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from finemoe.engine.stats import LayerCut


class SegmentedGraph:
    """Records `fn` as CUDA graphs cut by `OffloadRuntime.run_layer` (through `cut`) and replays them."""

    def __init__(self, runtime, pool=None) -> None:
        self.runtime = runtime
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.cuts: list[LayerCut] = []
        self.resident_topk: list[tuple[int, torch.Tensor]] = []
        self.output = None

    # ---- capture -------------------------------------------------------------------------------
    def _begin(self) -> None:
        g = torch.cuda.CUDAGraph()
        g.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self.graphs.append(g)

    def cut(self, cut: LayerCut) -> None:
        """Called from inside the capture when layer `cut.layer` has routed: close the running graph, allocate
        the layer's static buffers (not capturing), open the next graph."""
        self.graphs[-1].capture_end()
        self.runtime.allocate_static(cut)
        self.cuts.append(cut)
        self._begin()

    def capture(self, fn: Callable[[], object], stream: torch.cuda.Stream) -> None:
        """Record `fn()` (whose tensors must all live at fixed addresses) on `stream`; `self.output` keeps its
        result."""
        rt = self.runtime
        torch.cuda.synchronize()
        first = len(rt._resident_topk)   # capture runs inside an iteration: keep its own entries apart
        rt.capture = self
        try:
            with torch.cuda.stream(stream):
                self._begin()
                try:
                    self.output = fn()
                finally:
                    self.graphs[-1].capture_end()
        finally:
            rt.capture = None
            self.resident_topk = rt._resident_topk[first:]   # the graph's own top-k tensors, re-read at every replay
            del rt._resident_topk[first:]
        torch.cuda.synchronize()   # the static buffers' zero fill (on `stream`, between captures) has landed

    # ---- replay --------------------------------------------------------------------------------
    def replay(self):
        """One decode step on the current stream, with the runtime's host work between the graphs."""
        rt = self.runtime
        self.graphs[0].replay()
        for cut, graph in zip(self.cuts, self.graphs[1:]):
            step = rt.begin_replayed_layer(cut)   # HOST SYNC: layer's routing (hybrid: and the CPU half's inputs)
            graph.replay()
            rt.finish_layer(step)
        if self.resident_topk:
            rt._resident_topk.extend(self.resident_topk)
        return self.output

"""Which decode path a batch takes, and the static batch shapes kept for reuse.

The fast path (static KV cache; CUDA graphs on CUDA) is taken unless the model cannot use it
(`static_cache_blocker`) or the config turns it off. Each batch shape (rows, bucketed length) keeps its
fixed-address state and captured step; the least recently used shapes beyond MAX_STATIC_SHAPES are freed.
"""
from __future__ import annotations

from collections import OrderedDict

from finemoe.engine.decoders import DynamicDecoder, StaticDecoder
from finemoe.engine.static_kv import StaticState, bucket_length, static_cache_blocker

MAX_STATIC_SHAPES = 2   # batch shapes whose static KV cache (and captured step) stay allocated


class DecodePaths:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.blocker = static_cache_blocker(engine.model) if engine.cfg.fast_path else "disabled by configuration"
        self.graph_failure: str | None = None
        self.static: OrderedDict[tuple[int, int], StaticState] = OrderedDict()

    def decoder_for(self, requests):
        if self.blocker is not None:
            return DynamicDecoder(self.engine)
        need = max(len(r.prompt_ids) for r in requests) + max(r.params.max_new_tokens for r in requests)
        return StaticDecoder(self.engine, len(requests), bucket_length(need))

    def static_state(self, batch: int, length: int) -> StaticState:
        """The fixed-address buffers (and captured step) for this batch shape."""
        key = (batch, length)
        e = self.engine
        st = self.static.pop(key, None) or StaticState(e.model, batch, length, e.device)
        self.static[key] = st
        while len(self.static) > MAX_STATIC_SHAPES:
            self.static.popitem(last=False)
        return st

    def graphs_allowed(self, batch: int) -> bool:
        """CUDA graphs for decode batches of this size: on CUDA, unless disabled or a capture failed, and
        only when every layer's experts fit one pool window (see runtime.graph_ready). Every --miss-compute mode:
        a hybrid layer's CPU half runs between segment replays (engine/cpu_misses.py). Never with the decoder layers
        split over several GPUs (see `describe`)."""
        e = self.engine
        if e.device.type != "cuda" or not e.cfg.cuda_graphs or self.graph_failure is not None or e.layer_split.splits:
            return False
        g = e.geometry
        return e.runtime.graph_ready and (e.policy.keeps_all_resident or
                                          e.cache.capacity >= min(batch * g.top_k, g.num_experts))

    def graphs_failed(self, reason: str) -> None:
        self.graph_failure = reason
        self.drop_graphs()

    def drop_static(self) -> None:
        """Free every static shape (its KV cache and captured step): the decoder layers moved to other devices."""
        self.static.clear()

    def drop_graphs(self) -> None:
        for st in self.static.values():
            st.drop_graph()

    def describe(self) -> str:
        e = self.engine
        if self.blocker is not None:
            return f"eager, dynamic KV cache ({self.blocker})"
        if e.device.type != "cuda" or not e.cfg.cuda_graphs:
            return "eager, static KV cache"
        if self.graph_failure is not None:
            return f"eager, static KV cache (CUDA graph capture failed: {self.graph_failure})"
        if e.layer_split.splits:
            return ("eager, static KV cache (the layers are split over several GPUs: torch.cuda.graph captures one "
                    "device's stream, a split step runs kernels and copies on every GPU's stream)")
        return "CUDA graphs, static KV cache" + ("" if e.runtime.graph_ready else
                                                   " (eager: the cache has more slots than one graph window)")

"""How a batch's forward passes run: the KV cache, masks and positions of one batch (see batch.BatchRunner).

Contract of a decoder: `prefill(it, token_rows, ids [B, P], mask [B, P])` and `decode(it, token_rows,
last [B, 1])` each run one iteration through `Engine.iterate` and return the last-token logits [B', V]
(B' = the decoder's batch rows); `retire(keep)` drops finished rows (`fixed_batch` decoders keep them:
their rows stay in place and the runner marks them DEAD_ROW).
"""
from __future__ import annotations

import logging

import torch

from finemoe.engine.graphs import SegmentedGraph
from finemoe.models.kv_cache import cache_kwargs, returned_cache

log = logging.getLogger(__name__)


class DynamicDecoder:
    """transformers' DynamicCache and 2-D masks, rows dropped as they finish (any model, any device)."""

    fixed_batch = False

    def __init__(self, engine) -> None:
        self.engine = engine
        self.cache = None
        self.mask: torch.Tensor | None = None       # [B, S] attention mask so far
        self.positions: torch.Tensor | None = None  # [B, 1] position of the last token

    def _forward(self, ids, mask, pos):
        model = self.engine.model
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **cache_kwargs(model, self.cache))
        self.cache = returned_cache(model, out)
        return out.logits[:, -1, :]

    def prefill(self, it, token_rows, ids, mask):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)                                    # [B, P]
        self.mask, self.positions = mask, pos[:, -1:]
        return self.engine.iterate(it, token_rows, lambda: self._forward(ids, mask, pos))

    def decode(self, it, token_rows, last):
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions + 1
        return self.engine.iterate(it, token_rows, lambda: self._forward(last, self.mask, self.positions))

    def retire(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, device=self.engine.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.positions = self.mask[idx], self.positions[idx]


class StaticDecoder:
    """The fast path: a static KV cache shared by batches of the same shape; on CUDA, decode steps replay
    a captured graph (the first decode step of a new shape runs eagerly, then the step is captured)."""

    fixed_batch = True

    def __init__(self, engine, batch: int, length: int) -> None:
        self.engine = engine
        self.state = engine.paths.static_state(batch, length)
        self.use_graph = engine.paths.graphs_allowed(batch)

    def prefill(self, it, token_rows, ids, mask):
        st = self.state
        mask4, pos = st.prefill_inputs(mask)
        return self.engine.iterate(it, token_rows, lambda: self._prefill_forward(ids, mask4, pos))

    def _prefill_forward(self, ids, mask4, pos):
        model = self.engine.model
        out = model(input_ids=ids, attention_mask=mask4, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **cache_kwargs(model, self.state.kv))
        return out.logits[:, -1, :]

    def decode(self, it, token_rows, last):
        st = self.state
        st.ids.copy_(last)
        if not self.use_graph:
            return self.engine.iterate(it, token_rows, st.step)
        if st.graph is not None:
            return self.engine.iterate(it, token_rows, st.graph.replay)
        with torch.cuda.stream(st.stream):   # eager first step on the capture stream (warms it up)
            st.stream.wait_stream(torch.cuda.current_stream(self.engine.device))
            logits = self.engine.iterate(it, token_rows, st.step).clone()
        torch.cuda.current_stream(self.engine.device).wait_stream(st.stream)
        self._capture()
        return logits

    def _capture(self) -> None:
        st = self.state
        graph = SegmentedGraph(self.engine.runtime)
        try:
            graph.capture(st.step, st.stream)   # records only: pos, cur and the cache do not move
        except Exception as e:  # noqa: BLE001  a model we cannot capture still runs, eagerly
            log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
            self.engine.paths.graphs_failed(f"{type(e).__name__}: {e}")
            self.use_graph = False
            return
        st.graph = graph

    def retire(self, keep: list[int]) -> None:
        """Rows stay in a static batch; the runner stops feeding them and marks them dead."""

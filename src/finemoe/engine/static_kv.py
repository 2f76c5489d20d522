"""The fast decode path: a static KV cache, explicit attention masks and (on CUDA) a captured decode step.

Every tensor a decode step reads or writes lives at a fixed address: transformers' `StaticCache`
[B, heads, S, d], the input token [B, 1], the positions [B, 1], the write index `cur` [1] and the padding
mask [B, S]. The step builds its own 4-D boolean mask from them (so transformers' mask helpers, which
inspect mask contents on the host, never run), calls the unmodified model, and advances `pos` and `cur` on
the device. That step can therefore be recorded once as CUDA graph(s) (`graphs.SegmentedGraph`) and
replayed for every later token of every batch of the same shape. On the CPU the same step runs eagerly:
same cache, same masks, same results.

Batch rows never leave a static batch: a finished row keeps computing (its token rows are marked
DEAD_ROW, so no expert is loaded for it) until the whole batch is done.
"""
from __future__ import annotations

import logging

import torch
from transformers import StaticCache

from finemoe.engine.graphs import SegmentedGraph
from finemoe.models.kv_cache import cache_kwargs

log = logging.getLogger(__name__)
LENGTH_BUCKET = 256   # static caches are sized in multiples of this many tokens


def static_cache_blocker(model) -> str | None:
    """Why this model cannot use the static path (None if it can)."""
    try:
        probe = StaticCache(config=model.config, max_cache_len=8)
    except Exception as e:  # noqa: BLE001  (any construction failure means: not supported)
        return f"transformers' StaticCache does not support it ({type(e).__name__}: {e})"
    indexed = [hasattr(layer, "indexer_keys") for layer in probe.layers]   # DSA: the indexer attends over its own
    kinds = [n for n, flags in (("sliding-window", probe.is_sliding), ("linear-attention", probe.is_linear),
                                ("sparse-attention indexer", indexed)) if any(flags)]   # key cache, unmasked
    if kinds:
        return f"it has {' and '.join(kinds)} layers (the fast path builds full-attention masks only)"
    return None


def bucket_length(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


class StaticState:
    """Fixed-address buffers for batches of B rows and up to S tokens, plus the captured step (CUDA)."""

    def __init__(self, model, batch: int, length: int, device: torch.device) -> None:
        self.model, self.B, self.S, self.device = model, batch, length, device
        self.kv = StaticCache(config=model.config, max_cache_len=length)
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=device)          # [B, 1] token to feed
        self.pos = torch.zeros((batch, 1), dtype=torch.long, device=device)          # [B, 1] its position id
        self.cur = torch.zeros((1,), dtype=torch.long, device=device)                # [1] its KV write index
        self.pad_ok = torch.ones((batch, length), dtype=torch.bool, device=device)   # [B, S] False on left padding
        self.kv_index = torch.arange(length, device=device)                          # [S]
        self.graph: SegmentedGraph | None = None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def prefill_inputs(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reset the cache for a new batch; mask [B, P] (1 = token, 0 = left pad) -> (4-D mask, position ids)."""
        P = mask.shape[1]
        self.kv.reset()
        self.pad_ok.fill_(True)
        self.pad_ok[:, :P] = mask.bool()
        q = self.kv_index[:P, None]                                                  # [P, 1]
        allowed = (self.kv_index[None, :] <= q) & self.pad_ok[:, None, :]            # [B, P, S] causal, no pads
        allowed |= self.kv_index[None, :] == q                                       # a pad query sees itself
        pos = (mask.cumsum(-1) - 1).clamp(min=0)                                     # [B, P]
        self.pos.copy_(pos[:, -1:] + 1)
        self.cur.fill_(P)
        return allowed[:, None], pos

    def step(self) -> torch.Tensor:
        """One decode step from the fixed buffers -> last-token logits [B, V]. Capturable: no host sync."""
        allowed = self.pad_ok & (self.kv_index <= self.cur)                           # [B, S]
        out = self.model(input_ids=self.ids, attention_mask=allowed[:, None, None, :], position_ids=self.pos,
                         use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, self.kv))
        self.pos.add_(1)
        self.cur.add_(1)
        return out.logits[:, -1, :]

    def drop_graph(self) -> None:
        self.graph = None

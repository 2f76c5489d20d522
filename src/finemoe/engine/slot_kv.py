"""The KV cache of continuous batching: a fixed row (slot) per running request, each row with its own length.

`SlotKV` is a transformers `Cache` (the public extension point: one `CacheLayerMixin` per attention layer) over
[R, heads, S, d] tensors per layer and kind (keys, values). A forward pass covers slot rows [0, B) and T columns;
`write` [B, T] says where each of its tokens' keys and values go in its row (its position: a request's tokens sit
at positions 0.. of its own row, no padding). Tokens that carry nothing (a free slot's row, the unused columns of a
row in a step with longer rows) write to the last column, TRASH, which no real query attends. So a row joins,
prefills in chunks and leaves without touching any other row, and a decode step of B rows reads and writes only
fixed-address tensors (ids, write positions, the KV): it can be captured as CUDA graphs per row bucket.

`attention_masks(write, ...)` builds the explicit masks from the write positions (a query at position p sees its
own row's positions 0..p; sliding-window layers the last `window` of them), so transformers' mask helpers,
which inspect mask contents on the host, never run. `S` grows (in LENGTH_BUCKET steps, rows copied) when a
longer request joins; every captured graph must then be dropped (`grow` returns True).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from finemoe.engine.static_kv import bucket_length


def slot_kv_blocker(model) -> str | None:
    """Why continuous batching's slot KV cache cannot run this model (None if it can)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    unknown = kinds - {"full_attention", "sliding_attention"}
    if unknown:
        return f"it has {' and '.join(sorted(unknown))} layers (the slot KV cache holds attention layers only)"
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        return f"its attention implementation {impl!r} takes no explicit 4-D masks (use sdpa or eager)"
    return None


class SlotLayer(CacheLayerMixin):
    """One attention layer's rows. The shared `SlotKV` says where this forward's tokens write (`kv.write`)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, kv: SlotKV) -> None:
        super().__init__()
        self.kv = kv

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        kv = self.kv
        self.keys = key_states.new_zeros((kv.rows, key_states.shape[1], kv.length, key_states.shape[-1]))
        self.values = value_states.new_zeros((kv.rows, value_states.shape[1], kv.length, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states [B, h, T, d] -> this layer's rows [0, B) with them written at `kv.write` [B, T]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        write = self.kv.write.to(self.keys.device)          # the layer's device (--non-expert-placement split)
        B = write.shape[0]
        rows = self.kv.row_index[:B, None].to(self.keys.device).expand_as(write)    # [B, T]
        self.keys[rows, :, write] = key_states.transpose(1, 2).to(self.keys.dtype)   # [B, T, h, d]
        self.values[rows, :, write] = value_states.transpose(1, 2).to(self.values.dtype)
        return self.keys[:B], self.values[:B]

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.kv.length, 0

    def get_seq_length(self) -> int:
        return 0   # positions are always passed explicitly

    def get_max_length(self) -> int:
        return self.kv.length

    def grow(self, length: int) -> None:
        if self.is_initialized:
            old = self.keys.shape[2] - 1          # the old TRASH column is dropped: it held nothing
            for name in ("keys", "values"):
                t = getattr(self, name)
                new = t.new_zeros((t.shape[0], t.shape[1], length, t.shape[3]))
                new[:, :, :old] = t[:, :, :old]
                setattr(self, name, new)


class SlotKV(Cache):
    """`rows` request slots of up to `length - 1` tokens each (the last column is TRASH)."""

    def __init__(self, num_layers: int, rows: int, tokens: int, device: torch.device) -> None:
        self.rows = rows
        self.length = bucket_length(tokens) + 1
        self.row_index = torch.arange(rows, device=device)                 # [R]
        self.write: torch.Tensor | None = None                             # [B, T] set before each forward
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    @property
    def trash(self) -> int:
        return self.length - 1

    def fits(self, tokens: int) -> bool:
        return tokens <= self.trash

    def grow(self, tokens: int) -> bool:
        """Make room for `tokens` per row (rows kept); True when the tensors moved (captured graphs are stale)."""
        if self.fits(tokens):
            return False
        self.length = bucket_length(tokens) + 1
        for layer in self.layers:
            layer.grow(self.length)
        return True


def attention_masks(write: torch.Tensor, length: int, windows: dict[str, int | None], dtype: torch.dtype,
                    additive: bool) -> torch.Tensor | dict[str, torch.Tensor]:
    """write [B, T] (TRASH = length - 1 for tokens that carry nothing) -> a mask [B, 1, T, length] per layer type
    (`windows`, see `layer_windows`; one type: the tensor itself): a real query at position p sees its row's
    positions 0..p (in a sliding layer only the last `window` of them); a TRASH query sees every real column and
    itself (finite, never read). Boolean for sdpa, additive (0 or the dtype's minimum) for eager attention.
    Capturable: device ops only."""
    kv_index = torch.arange(length, device=write.device)                          # [S]
    q = write[:, :, None]                                                         # [B, T, 1]
    causal = (kv_index <= q) & (kv_index < length - 1)                            # [B, T, S]
    out = {}
    for kind, window in windows.items():
        allowed = causal if window is None else causal & (kv_index > q - window)
        allowed = (allowed | (kv_index == q))[:, None]                            # [B, 1, T, S]
        out[kind] = allowed if not additive else torch.zeros(allowed.shape, dtype=dtype, device=write.device
                                                              ).masked_fill_(~allowed, torch.finfo(dtype).min)
    return next(iter(out.values())) if len(out) == 1 else out


def layer_windows(model) -> dict[str, int | None]:
    """The masks the model's forward reads, by layer type, with their window (None: full attention). A model
    without `layer_types` builds one mask for every layer (sliding when its config has a window)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(text, "sliding_window", None) or None     # 0 means none (e.g. Qwen2-MoE without windows)
    kinds = getattr(text, "layer_types", None)
    if not kinds:
        return {"full_attention": window}
    return {kind: (window if kind == "sliding_attention" else None) for kind in sorted(set(kinds))}


def num_attention_layers(model) -> int:
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(text.num_hidden_layers)

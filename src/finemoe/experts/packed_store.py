"""Routed-expert weights in host memory packed (experts/codec.py: 12 bits per bf16 weight), held once.

`--expert-transfer packed` replaces the host store's plain tensors by this, layer by layer (the host holds 3/4 of
the bytes), and the transports (experts/packed_transport.py) copy an expert's packed bytes and unpack them on the
device into its slot, bit for bit the plain weights.

One expert's copy is one flat uint8 buffer, `data[layer][expert]`: a header of `ALIGN` bytes whose byte k *
BASE_STRIDE is tensor k's exponent window base, then each expert tensor's packed bytes in pool order (SlotPools'
names), each at an `ALIGN`ed offset (`parts`); `copy_bytes` is its length, the unit of the idle issue rule's chunks.
Its escapes (weights outside their tensor's exponent window) ride with the copy's last bytes: a slice of its layer's
int64 positions and int16 bit patterns, its tensors' escapes in pool order (`esc_counts`). Pinned on CUDA (the
buffers in place, the escapes through torch's pinned allocator)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from finemoe.errors import ConfigError
from finemoe.experts import codec
from finemoe.experts.host_store import HostExpertStore, _pin_in_place, pinnable_where_it_lies

ALIGN = 256     # byte offset of each tensor's packed bytes in an expert's buffer (aligned device loads)
BASE_STRIDE = 16   # header byte of tensor k's window base: k * BASE_STRIDE (each base its own aligned element)


class Part(NamedTuple):
    """Where one expert tensor's packed bytes sit in an expert's buffer."""

    name: str
    offset: int       # bytes from the buffer's start
    numel: int        # weights (the packed bytes are numel * 3 // 2)


class PackedStore:
    """data[layer]: [J, copy_bytes] uint8; bases [L, J, P] uint8 (P tensors per expert); esc_counts [L, J, P];
    escapes[layer]: (positions int64, bit patterns int16), expert after expert, each expert's over its P tensors in
    order (expert j's at esc_start[layer, j]:esc_start[layer, j + 1]; positions within their tensor)."""

    def __init__(self, geometry, parts: list[Part], data: list[torch.Tensor], bases: np.ndarray,
                 esc_counts: np.ndarray, escapes: list[tuple[torch.Tensor, torch.Tensor]], pinned: bool) -> None:
        self.geometry = geometry
        self.parts = parts
        self.data = data
        self.bases = bases
        self.esc_counts = esc_counts
        self.escapes = escapes
        self.pinned = pinned
        self.copy_bytes = int(data[0].shape[1])
        per_expert = esc_counts.sum(-1)                                          # [L, J]
        self.max_escapes = int(per_expert.max()) if per_expert.size else 0
        self.esc_start = np.concatenate([np.zeros((per_expert.shape[0], 1), np.int64), np.cumsum(per_expert, 1)],
                                        axis=1)                                   # [L, J + 1] into a layer's escapes

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {part.name: torch.bfloat16 for part in self.parts}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.data) + sum(p.numel() * 8 + v.numel() * 2 for p, v in self.escapes)

    def part_views(self, data: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """An expert's packed buffer `data` [copy_bytes] (any device) -> per tensor (its packed bytes, its window
        base as a 1-element view), what codec.unpack_into takes."""
        return [(data[p.offset:p.offset + p.numel * 3 // 2], data[k * BASE_STRIDE:k * BASE_STRIDE + 1])
                for k, p in enumerate(self.parts)]

    def expert_sources(self, layer: int, expert: int) -> list[torch.Tensor]:
        """The host tensors one copy of expert `expert` of `layer` moves: its buffer and its escapes."""
        a, b = self.esc_start[layer, expert], self.esc_start[layer, expert + 1]
        pos, val = self.escapes[layer]
        return [self.data[layer][expert], pos[a:b], val[a:b]]

    def close(self) -> None:
        """Unpin the host buffers; the store must not be used afterwards."""
        if self.pinned:
            for t in self.data:
                if t.untyped_storage().resizable():        # pinned in place (torch's pinned blocks free themselves)
                    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
            self.pinned = False

    @classmethod
    def pack(cls, store: HostExpertStore, show_progress: bool = False) -> PackedStore:
        """Pack every expert of `store` and release its plain tensors one layer at a time (the host peak stays one
        plain layer above the packed store). The store is closed afterwards. Experts must be bf16."""
        g = store.geometry
        names = list(store.tensors[0])
        if any(t.dtype != torch.bfloat16 for t in store.tensors[0].values()):
            dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in store.tensors[0].values()})
            raise ConfigError(f"--expert-transfer packed needs bf16 experts, this model's are {', '.join(dtypes)}: "
                              "load it with --dtype bfloat16 or use --expert-transfer plain")
        if len(names) * BASE_STRIDE > ALIGN:
            raise ConfigError(f"--expert-transfer packed holds at most {ALIGN // BASE_STRIDE} tensors per expert; "
                              f"this model's experts have {len(names)}: use --expert-transfer plain")
        parts, offset = [], ALIGN          # the header: byte k * BASE_STRIDE holds part k's window base
        for name in names:
            numel = int(np.prod(g.param_shapes[name]))
            if numel % 2:
                raise ConfigError(f"--expert-transfer packed needs an even number of weights per expert tensor; "
                                  f"{name} has {numel}: use --expert-transfer plain")
            parts.append(Part(name, offset, numel))
            offset += -(-numel * 3 // 2 // ALIGN) * ALIGN
        L, J, P = g.num_layers, g.num_experts, len(names)
        pin = store.pinned
        bases, counts = np.zeros((L, J, P), np.uint8), np.zeros((L, J, P), np.int64)
        data, escapes = [], []
        for layer in tqdm(range(L), desc="experts -> packed", disable=None if show_progress else True, unit="layer"):
            buf = torch.zeros((J, offset), dtype=torch.uint8)
            rows = []
            for k, part in enumerate(parts):
                packed = codec.pack_rows(store.tensors[layer][part.name])
                buf.numpy()[:, part.offset:part.offset + part.numel * 3 // 2] = packed.data
                bases[layer, :, k] = packed.bases
                buf.numpy()[:, k * BASE_STRIDE] = packed.bases
                counts[layer, :, k] = np.diff(packed.esc_start)
                rows.append(packed)
            store.release_layer(layer)
            # the layer's escapes, expert-major and in pool order within an expert: one buffer of each kind
            order = [(j, k) for j in range(J) for k in range(P)]
            pos = np.concatenate([rows[k].escapes(j)[0] for j, k in order] + [np.empty(0, np.int64)])
            val = np.concatenate([rows[k].escapes(j)[1] for j, k in order] + [np.empty(0, np.int16)])
            pos_t, val_t = torch.from_numpy(pos), torch.from_numpy(val)
            if pin:
                if pinnable_where_it_lies(buf):
                    _pin_in_place(buf)
                else:
                    buf = buf.pin_memory()
                pos_t, val_t = pos_t.pin_memory(), val_t.pin_memory()
            data.append(buf)
            escapes.append((pos_t, val_t))
        packed = cls(g, parts, data, bases, counts, escapes, pin)
        if packed.copy_bytes + packed.max_escapes * 10 > g.expert_bytes:   # the staging buffers' bound
            packed.close()
            raise ConfigError(f"these experts do not pack: up to {packed.max_escapes} weights of an expert fall "
                              "outside its 15 most used exponents, so a packed copy would move more than a plain "
                              "one; use --expert-transfer plain")
        return packed

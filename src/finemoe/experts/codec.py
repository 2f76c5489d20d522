"""Lossless packing of bf16 expert weights: 12 bits per weight instead of 16, unpacked on the device bit for bit.

A bf16 weight is a sign bit, 8 exponent bits and 7 mantissa bits. Weights, trained or initialised, use few
exponents: in one expert tensor the 15 consecutive exponents [base, base + 15) holding the most weights hold all
but a tiny share of them (a normal(0, 0.02) init: about 2e-4 outside; ref-moe's trained experts: under 1e-3). A packed
tensor of N weights (N even) is one flat uint8 buffer:

    sm     [N]      bit 7: the sign; bits 0..6: the mantissa
    codes  [N / 2]  two 4-bit exponent codes per byte, element 2i in the low nibble: exponent - base, or ESCAPE
and, beside it, the escaped weights (exponent outside the window: zeros, subnormals, outliers) as their positions
[E] int64 and whole bf16 bit patterns [E] int16, which `unpack` writes last. Copying the packed buffer moves 3/4 of
the bytes; `unpack` rebuilds the exact weights from it with elementwise byte operations (any device).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

WINDOW = 15          # exponents coded in the window; code 15 escapes
ESCAPE = 15


class Packed(NamedTuple):
    """One bf16 tensor of `numel` weights (even), packed (module docstring)."""

    data: torch.Tensor        # [numel * 3 // 2] uint8: sm then codes
    base: int                 # the window's first exponent
    esc_pos: torch.Tensor     # [E] int64 flat positions of the escaped weights
    esc_val: torch.Tensor     # [E] int16 their bf16 bit patterns
    numel: int

    @property
    def nbytes(self) -> int:
        """Bytes a copy of the packed weights moves (the buffer and the escapes)."""
        return self.data.numel() + self.esc_pos.numel() * 8 + self.esc_val.numel() * 2


def packable(t: torch.Tensor) -> bool:
    """Whether `pack` takes `t`: bf16 with an even number of weights."""
    return t.dtype == torch.bfloat16 and t.numel() % 2 == 0


def pack(t: torch.Tensor) -> Packed:
    """Pack bf16 tensor `t` (host; any shape, even numel) losslessly (module docstring)."""
    if not packable(t):
        raise ValueError(f"cannot pack a {t.dtype} tensor of {t.numel()} weights: bf16 with an even count only")
    bits = t.detach().contiguous().view(-1).view(torch.int16).numpy().view(np.uint16)    # [N]
    exponent = ((bits >> 7) & 0xFF).astype(np.uint8)                                       # [N]
    counts = np.bincount(exponent, minlength=256)                                          # [256]
    held = np.convolve(counts, np.ones(WINDOW, np.int64), mode="valid")                    # [242]: [b, b + 15)
    base = int(np.argmax(held))
    code = exponent.astype(np.int16) - base                                                # [N]
    escaped = (code < 0) | (code >= WINDOW)
    code[escaped] = ESCAPE
    code = code.astype(np.uint8)
    sm = ((bits >> 8) & 0x80).astype(np.uint8) | (bits & 0x7F).astype(np.uint8)            # [N]
    codes = code[0::2] | (code[1::2] << 4)                                                 # [N / 2]
    pos = np.flatnonzero(escaped)
    return Packed(torch.from_numpy(np.concatenate([sm, codes])), base, torch.from_numpy(pos.astype(np.int64)),
                  torch.from_numpy(bits[pos].view(np.int16).copy()), int(bits.size))


def unpack_into(data: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> None:
    """data [N * 3 // 2] uint8 (a packed buffer, on out's device), base: a 0-dim uint8 tensor there -> out, a
    contiguous bf16 tensor of N weights, every weight but the escaped ones (`write_escapes` writes those).
    Elementwise uint8 operations only: one compiled kernel under torch.compile."""
    n = out.numel()
    sm, codes = data[:n], data[n:]                                                         # [N], [N / 2]
    exponent = torch.stack((codes & 15, codes >> 4), dim=-1).view(-1) + base               # [N] uint8
    low = ((exponent & 1) << 7) | (sm & 0x7F)                                # [N]: exponent bit 0, mantissa
    high = (sm & 0x80) | (exponent >> 1)                                     # [N]: sign, exponent bits 7..1
    out.view(-1).view(torch.uint8).view(n, 2).copy_(torch.stack((low, high), dim=-1))      # little-endian bf16


def write_escapes(pos: torch.Tensor, val: torch.Tensor, out: torch.Tensor) -> None:
    """The escaped weights' bit patterns val [E] int16 at flat positions pos [E] of bf16 tensor `out`."""
    if pos.numel():
        out.view(-1).view(torch.int16).index_copy_(0, pos, val)


def unpack(p: Packed) -> torch.Tensor:
    """The packed tensor's weights, flat bf16 [numel], on the packed buffer's device."""
    out = torch.empty(p.numel, dtype=torch.bfloat16, device=p.data.device)
    unpack_into(p.data, torch.tensor(p.base, dtype=torch.uint8, device=p.data.device), out)
    write_escapes(p.esc_pos.to(out.device), p.esc_val.to(out.device), out)
    return out

"""Lossless packing of bf16 expert weights: 12 bits per weight instead of 16, unpacked on the device bit for bit.

A bf16 weight is a sign bit, 8 exponent bits and 7 mantissa bits. Weights, trained or initialised, use few
exponents: in one expert tensor the 15 consecutive exponents [base, base + 15) holding the most weights hold all
but a tiny share of them (a normal(0, 0.02) init: about 2e-4 outside; ref-moe's trained experts: under 1e-3). A
packed tensor of N weights (N even) is N * 3 / 2 bytes:

    sm     [N]      bit 7: the sign; bits 0..6: the mantissa
    codes  [N / 2]  two 4-bit exponent codes per byte, element 2i in the low nibble: exponent - base, or 15 for
                    exponent 0 (zeros and subnormals) and for the escaped weights
and, beside it, the escaped weights (a nonzero exponent outside the window: outliers) as their flat positions [E]
int64 and whole bf16 bit patterns [E] int16, which `write_escapes` writes after `unpack_into`.
Copying a packed tensor moves 3/4 of the bytes. Packing is compiled (numba, parallel over the rows of a stacked
tensor: one pass to pick each row's window, one to encode); unpacking is elementwise byte arithmetic in torch, on
any device (one fused kernel under torch.compile).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from numba import prange

from finemoe.jit import njit, njit_parallel

WINDOW = 15          # exponents coded in the window
ZERO_EXPONENT = 15   # the 16th code: exponent 0 (zeros, subnormals), or an escaped weight (written afterwards)


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


class PackedRows(NamedTuple):
    """Rows [R, N] of a bf16 tensor (one per expert), each packed on its own: data [R, N * 3 // 2] uint8, bases [R]
    uint8, and row r's escapes at esc_pos / esc_val[esc_start[r]:esc_start[r + 1]] (positions within the row)."""

    data: np.ndarray
    bases: np.ndarray
    esc_start: np.ndarray     # [R + 1] int64
    esc_pos: np.ndarray       # [sum E] int64
    esc_val: np.ndarray       # [sum E] int16

    def escapes(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.esc_start[r], self.esc_start[r + 1]
        return self.esc_pos[a:b], self.esc_val[a:b]


@njit
def _window(bits):
    """bits [N] uint16 -> (base, escapes): the 15 consecutive nonzero exponents [base, base + 15) holding the most
    weights (the lowest such; base >= 1) and how many weights fall outside them and are not exponent 0."""
    counts = np.zeros(256, np.int64)
    for i in range(bits.size):
        counts[(bits[i] >> 7) & 0xFF] += 1
    best, base, run = -1, 1, 0
    for e in range(1, 256):
        run += counts[e]
        if e >= WINDOW + 1:
            run -= counts[e - WINDOW]
        if e >= WINDOW and run > best:
            best, base = run, e - WINDOW + 1
    return base, bits.size - counts[0] - best


@njit
def _encode(bits, base, data, esc_pos, esc_val):
    """bits [N] uint16 -> data [N * 3 // 2] uint8 and the escapes (their arrays sized by `_window`)."""
    n = bits.size
    k = 0
    for i in range(n):
        b = bits[i]
        exponent = np.int64((b >> 7) & 0xFF)
        code = exponent - base
        if exponent == 0:
            code = ZERO_EXPONENT
        elif code < 0 or code >= WINDOW:
            code = ZERO_EXPONENT
            esc_pos[k] = i
            esc_val[k] = np.int16(np.int64(b) - 65536 if b >= 32768 else b)
            k += 1
        data[i] = np.uint8(((b >> 8) & 0x80) | (b & 0x7F))
        if i & 1:
            data[n + i // 2] |= np.uint8(code << 4)
        else:
            data[n + i // 2] = np.uint8(code)


@njit_parallel
def _pack_rows(bits, bases, counts):
    """bits [R, N] uint16 -> each row's window base (bases [R]) and escape count (counts [R])."""
    for r in prange(bits.shape[0]):
        bases[r], counts[r] = _window(bits[r])


@njit_parallel
def _encode_rows(bits, bases, data, esc_start, esc_pos, esc_val):
    for r in prange(bits.shape[0]):
        a, b = esc_start[r], esc_start[r + 1]
        _encode(bits[r], bases[r], data[r], esc_pos[a:b], esc_val[a:b])


def packable(t: torch.Tensor) -> bool:
    """Whether `pack` takes `t`: bf16 with an even number of weights (per row, for `pack_rows`)."""
    return t.dtype == torch.bfloat16 and t.numel() % 2 == 0


def pack_rows(t: torch.Tensor) -> PackedRows:
    """Pack each row of host bf16 tensor t [R, ...] (an even number of weights per row) losslessly."""
    R = t.shape[0]
    if t.dtype != torch.bfloat16 or (t.numel() // max(R, 1)) % 2:
        raise ValueError(f"cannot pack a {t.dtype} tensor of {t.numel()} weights: bf16 with an even count only")
    bits = t.detach().contiguous().view(torch.int16).reshape(R, -1).numpy().view(np.uint16)    # [R, N]
    N = bits.shape[1]
    data = np.empty((R, N * 3 // 2), np.uint8)
    bases, counts = np.zeros(R, np.int64), np.zeros(R, np.int64)
    _pack_rows(bits, bases, counts)
    esc_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    esc_pos, esc_val = np.empty(esc_start[-1], np.int64), np.empty(esc_start[-1], np.int16)
    _encode_rows(bits, bases, data, esc_start, esc_pos, esc_val)
    return PackedRows(data, bases.astype(np.uint8), esc_start, esc_pos, esc_val)


def pack(t: torch.Tensor) -> Packed:
    """Pack host bf16 tensor `t` (any shape, even numel) losslessly (module docstring)."""
    if not packable(t):
        raise ValueError(f"cannot pack a {t.dtype} tensor of {t.numel()} weights: bf16 with an even count only")
    rows = pack_rows(t.reshape(1, -1))
    pos, val = rows.escapes(0)
    return Packed(torch.from_numpy(rows.data[0]), int(rows.bases[0]), torch.from_numpy(pos.copy()),
                  torch.from_numpy(val.copy()), t.numel())


def unpack_into(data: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> None:
    """data [N * 3 // 2] uint8 (a packed buffer, on out's device), base: a 1-element uint8 tensor there -> out, a
    contiguous bf16 tensor of N weights, every weight but the escaped ones (`write_escapes` writes those).
    Elementwise int32 arithmetic into out's int16 view: one fused kernel under torch.compile."""
    n = out.numel()
    sm = data[:n].to(torch.int32)                                                          # [N]
    code = data[n:].view(-1, 1).expand(-1, 2).reshape(-1).to(torch.int32)                  # [N] each code byte twice
    code = (code >> ((torch.arange(n, device=data.device) & 1) * 4)) & 15                  # [N] low nibble, high
    exponent = torch.where(code == ZERO_EXPONENT, 0, code + base.to(torch.int32))          # [N]
    bits = ((sm & 0x80) << 8) | (exponent << 7) | (sm & 0x7F)                              # [N] in [0, 65535]
    out.view(-1).view(torch.int16).copy_(bits.to(torch.int16))                             # wraps to the bf16 bits


def write_escapes(pos: torch.Tensor, val: torch.Tensor, out: torch.Tensor) -> None:
    """The escaped weights' bit patterns val [E] int16 at flat positions pos [E] of bf16 tensor `out`."""
    if pos.numel():
        out.view(-1).view(torch.int16).index_copy_(0, pos, val)


def unpack(p: Packed) -> torch.Tensor:
    """The packed tensor's weights, flat bf16 [numel], on the packed buffer's device."""
    out = torch.empty(p.numel, dtype=torch.bfloat16, device=p.data.device)
    unpack_into(p.data, torch.tensor([p.base], dtype=torch.uint8, device=p.data.device), out)
    write_escapes(p.esc_pos.to(out.device), p.esc_val.to(out.device), out)
    return out

"""numpy's float32 sum, compiled: the pairwise summation numpy's add.reduce does over a contiguous vector
(blocks of up to 128 elements with eight accumulators, halves above that), so a compiled kernel that sums as
numpy does gets the same bits (row_kernels.py, store_kernels.py). tests/test_finemoe_row_kernels.py checks it
against numpy."""
from __future__ import annotations

import numpy as np

from finemoe.jit import njit
from finemoe.policies.finemoe.arrays import EPS

EPS32 = np.float32(EPS)


@njit
def _block_sum(x, lo, n):
    """x[lo:lo+n] (n <= 128) float32 summed as numpy's add.reduce sums a block: eight accumulators, from 0."""
    if n < 8:
        res = np.float32(0.0)
        for i in range(lo, lo + n):
            res += x[i]
        return res
    r0, r1, r2, r3 = x[lo], x[lo + 1], x[lo + 2], x[lo + 3]
    r4, r5, r6, r7 = x[lo + 4], x[lo + 5], x[lo + 6], x[lo + 7]
    i = 8
    while i < n - n % 8:
        j = lo + i
        r0 += x[j]
        r1 += x[j + 1]
        r2 += x[j + 2]
        r3 += x[j + 3]
        r4 += x[j + 4]
        r5 += x[j + 5]
        r6 += x[j + 6]
        r7 += x[j + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += x[lo + i]
        i += 1
    return res


@njit
def pairwise_sum(x, lo, n):
    """x[lo:lo+n] float32 summed as numpy's add.reduce sums a contiguous vector: a block of up to 128 elements
    with eight accumulators, else sum(first part) + sum(rest), the first part n // 2 rounded down to a multiple
    of 8. The split tree is walked iteratively (numba's on-disk cache of a self-recursive function is not
    reliable): post-order, so the additions happen in the recursion's order. Any length."""
    if n <= 128:
        return _block_sum(x, lo, n)
    seg_lo, seg_n = np.empty(64, np.int64), np.empty(64, np.int64)   # segments still open (depth < log2(n) + 1)
    seg_side = np.zeros(64, np.int64)                                 # 0: split next, 1: left summed, 2: both
    sums = np.empty(64, np.float32)                                   # partial sums, innermost last
    depth, m = 1, 0
    seg_lo[0], seg_n[0] = lo, n
    while depth:
        top = depth - 1
        s_lo, s_n = seg_lo[top], seg_n[top]
        if s_n <= 128:                                                # a block: its sum, done
            sums[m] = _block_sum(x, s_lo, s_n)
            m += 1
            depth -= 1
            continue
        half = s_n // 2
        half -= half % 8
        side = seg_side[top]
        if side == 2:                                                 # both halves summed: left + right
            sums[m - 2] = sums[m - 2] + sums[m - 1]
            m -= 1
            depth -= 1
            continue
        seg_side[top] = side + 1
        seg_lo[depth] = s_lo if side == 0 else s_lo + half
        seg_n[depth] = half if side == 0 else s_n - half
        seg_side[depth] = 0
        depth += 1
    return sums[0]


@njit
def norm_of(q):
    """sqrt(max(sum(q * q), 0)) of q [E] float32, as numpy computes it."""
    sq = q * q
    return np.float32(np.sqrt(max(pairwise_sum(sq, 0, sq.size), np.float32(0.0))))

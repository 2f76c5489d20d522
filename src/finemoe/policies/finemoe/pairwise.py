"""numpy's float32 sum, compiled: the pairwise summation numpy's add.reduce does over a contiguous vector
(blocks of up to 128 elements with eight accumulators, halves above that), so a compiled kernel that sums as
numpy does gets the same bits (row_kernels.py, store_kernels.py). tests/test_finemoe_row_kernels.py checks it
against numpy up to MAX_PAIRWISE."""
from __future__ import annotations

import numpy as np

from finemoe.jit import njit
from finemoe.policies.finemoe.arrays import EPS

EPS32 = np.float32(EPS)
MAX_PAIRWISE = 4096   # the longest vector `pairwise_sum` sums as numpy does


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
def _halves(n):
    """numpy's split of a vector longer than one block: the first part's length (a multiple of 8)."""
    half = n // 2
    return half - half % 8


@njit
def _sum_upto_256(x, lo, n):
    if n <= 128:
        return _block_sum(x, lo, n)
    h = _halves(n)
    return _block_sum(x, lo, h) + _block_sum(x, lo + h, n - h)


@njit
def _sum_upto_512(x, lo, n):
    if n <= 128:
        return _block_sum(x, lo, n)
    h = _halves(n)
    return _sum_upto_256(x, lo, h) + _sum_upto_256(x, lo + h, n - h)


@njit
def _sum_upto_1024(x, lo, n):
    if n <= 128:
        return _block_sum(x, lo, n)
    h = _halves(n)
    return _sum_upto_512(x, lo, h) + _sum_upto_512(x, lo + h, n - h)


@njit
def _sum_upto_2048(x, lo, n):
    if n <= 128:
        return _block_sum(x, lo, n)
    h = _halves(n)
    return _sum_upto_1024(x, lo, h) + _sum_upto_1024(x, lo + h, n - h)


@njit
def pairwise_sum(x, lo, n):
    """x[lo:lo+n] float32 (n <= MAX_PAIRWISE) summed as numpy's add.reduce sums a contiguous vector: blocks
    of up to 128 with eight accumulators, split in halves above that (unrolled: numba's cached recursion
    is not reliable)."""
    if n <= 128:
        return _block_sum(x, lo, n)
    h = _halves(n)
    return _sum_upto_2048(x, lo, h) + _sum_upto_2048(x, lo + h, n - h)


@njit
def norm_of(q):
    """sqrt(max(sum(q * q), 0)) of q [E] float32, as numpy computes it."""
    sq = q * q
    return np.float32(np.sqrt(max(pairwise_sum(sq, 0, sq.size), np.float32(0.0))))

"""Compiled per-layer steps of the baseline policies (numba; plain Python without it): moe-infinity's count
and dot-product update and best match (exact on a near tie), and the oracle's prefetch of the rest of an iteration.
Shapes: C stored rows, n experts of a layer, K flat expert keys."""
from __future__ import annotations

import numpy as np

from finemoe.jit import njit


@njit
def add_counts(keys, counts, eam, dots, by_key, size):
    """One request used experts `keys` [n] (flat, distinct) with `counts` [n] tokens each: eam [L*J] float32 +=
    counts; dots [C] float64 += counts . by_key[keys, :size] (each column's terms summed in key order; the
    products of small integer counts and float32 values are exact in float64)."""
    n = keys.size
    for i in range(n):
        eam[keys[i]] += counts[i]
    for c in range(size):
        acc = 0.0
        for i in range(n):
            acc += counts[i] * by_key[keys[i], c]
        dots[c] += acc


@njit
def near_best(dots, keep, near):
    """dots [C'] -> (first argmax, how many rows are >= its value * keep); their rows ascending in near [C']."""
    best = 0
    for c in range(1, dots.size):
        if dots[c] > dots[best]:
            best = c
    bar = dots[best] * keep
    m = 0
    for c in range(dots.size):
        if dots[c] >= bar:
            near[m] = c
            m += 1
    return best, m


@njit
def exact_best(eam, unit, rows, m):
    """eam [L*J] float32 counts, unit [C, L*J] float32 stored rows -> the row among rows[:m] whose product with eam
    is largest, each product computed in float64 (every term exact) summed in key order; the first among equals.
    The m sums advance together, key by key (independent chains), skipping keys the request has not used (their
    terms are +0.0 and leave a non-negative sum unchanged)."""
    acc = np.zeros(m)
    for key in range(eam.size):
        count = np.float64(eam[key])
        if count != 0.0:
            for i in range(m):
                acc[i] += count * np.float64(unit[rows[i], key])
    best = 0
    for i in range(1, m):
        if acc[i] > acc[best]:
            best = i
    return rows[best]


@njit
def absent_needs(keys, layer_of, lo, hi, resident, layer, out_keys, out_prio):
    """The keys[lo:hi] (needed at layers layer_of[lo:hi], float64) not resident [K] bool -> out_keys / out_prio
    (-(layer_of - layer): the sooner, the higher), in order. Returns (how many, the farthest distance or 0)."""
    m = 0
    horizon = 0.0
    for i in range(lo, hi):
        if not resident[keys[i]]:
            dist = layer_of[i] - layer
            out_keys[m] = keys[i]
            out_prio[m] = -dist
            horizon = max(horizon, dist)
            m += 1
    return m, horizon


def warm_up() -> None:
    """Compile (or load from numba's disk cache) every kernel with the types the policies pass."""
    near = np.zeros(2, np.int64)
    add_counts(np.zeros(1, np.int64), np.ones(1, np.int64), np.zeros(2, np.float32), np.zeros(2),
               np.ones((2, 2)), 2)
    near_best(np.ones(2), 0.5, near)
    exact_best(np.ones(2, np.float32), np.ones((2, 2), np.float32), near, 2)
    absent_needs(np.zeros(1, np.int64), np.zeros(1), 0, 1, np.zeros(2, np.bool_), 0, np.zeros(1, np.int64),
                 np.zeros(1))

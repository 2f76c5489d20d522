"""Compiled counting and matching of expert activation matrices (numba). Shapes: K = L * J flat keys, C stored rows,
B requests of an iteration, n experts of a layer.

A request's match is defined as the stored row whose product with the request's matrix is largest, each product
computed in float64 from the float32 values (every term exact) summed in key order, the lowest row among equals
(`exact_best`). The running products (`dots`, summed in arrival order) differ from the defining sums by less than
the tolerance (collection.TOL) relative, so when no other row is within it of the running best the argmax is certain;
otherwise the defining products of the rows within it decide (`match`)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from finemoe.jit import njit

MEAN = -1   # the match of a fresh request (no tokens routed yet): the collection's mean matrix


class StoredRows(NamedTuple):
    """An ActivationCollection's arrays as the compiled steps read them (`size` and `keep` are copies)."""

    unit: np.ndarray     # [C, K] float32 unit-normalised stored matrices
    by_key: np.ndarray   # [K, C] float64 unit.T
    share: np.ndarray    # [C, L, J] float32 per-layer usage share of each row
    near: np.ndarray     # [C] int64 scratch: the rows near the best
    size: int            # rows stored
    keep: float          # 1 - tolerance


@njit
def add_counts(keys, counts, eam, dots, by_key, size):
    """One request used experts `keys` [n] (flat, distinct) with `counts` [n] tokens each: eam [K] float32 +=
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
def add_layer_counts(layer, counts, eams, dots, by_key, size):
    """counts [B, J] int64: each request's token count per expert of `layer` -> `add_counts` of each request's
    used experts (ascending) into eams [B, K] / dots [B, C]."""
    B, J = counts.shape
    keys, used = np.empty(J, np.int64), np.empty(J, np.int64)
    for b in range(B):
        n = 0
        for j in range(J):
            if counts[b, j] != 0:
                keys[n] = layer * J + j
                used[n] = counts[b, j]
                n += 1
        add_counts(keys[:n], used[:n], eams[b], dots[b], by_key, size)


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
    """eam [K] float32 counts, unit [C, K] float32 stored rows -> the row among rows[:m] whose product with eam is
    largest, each product computed in float64 (every term exact) summed in key order; the first among equals.
    The m sums advance together, key by key, skipping keys the request has not used (their terms are +0.0 and
    leave a non-negative sum unchanged)."""
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
def match(eam, dots, stored):
    """One request's match: eam [K] float32, dots [C] float64 its running products -> the stored row (size > 0)."""
    best, m = near_best(dots[:stored.size], stored.keep, stored.near)
    if m > 1:                                         # a near tie: the defining products decide
        best = exact_best(eam, stored.unit, stored.near, m)
    return best


@njit
def match_rows(eams, dots, fresh, stored, out):
    """eams [B, K], dots [B, C], fresh [B] bool -> out [B] int64: each request's `match`, MEAN where fresh."""
    for b in range(eams.shape[0]):
        out[b] = MEAN if fresh[b] else match(eams[b], dots[b], stored)


def warm_up() -> None:
    """Compile (or load from numba's disk cache) every kernel with the types the policy passes."""
    stored = StoredRows(np.ones((2, 2), np.float32), np.ones((2, 2)), np.ones((2, 1, 2), np.float32),
                        np.zeros(2, np.int64), 2, 0.5)
    eams, dots = np.zeros((1, 2), np.float32), np.zeros((1, 2))
    add_counts(np.zeros(1, np.int64), np.ones(1, np.int64), eams[0], dots[0], stored.by_key, 2)
    add_layer_counts(0, np.ones((1, 2), np.int64), eams, dots, stored.by_key, 2)
    match_rows(eams, dots, np.zeros(1, np.bool_), stored, np.zeros(1, np.int64))

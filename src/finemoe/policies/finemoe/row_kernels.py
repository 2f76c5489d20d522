"""Compiled one-row search and selection: the decode case (batch of one, host float32 store) of search.py's
trajectory step, `blend` and selection.py's delta choice, one call each instead of ~20 numpy calls.

They do the numpy path's float32 operations in its order (numpy's pairwise sum included), so both paths make
the same plans to the last bit; tests/test_finemoe_row_kernels.py checks that. The store's [n, J] x [J]
product stays a numpy (BLAS) call in the caller, as on the numpy path. Shapes: n stored maps, J experts,
K neighbours.
"""
from __future__ import annotations

import numpy as np

from finemoe.jit import njit
from finemoe.policies.finemoe.pairwise import EPS32, norm_of, pairwise_sum


@njit
def top_entries(dots, norm, q_norm, k, idx, val):
    """cos[c] = dots[c] / max(norm[c] * q_norm, EPS) for the n = dots.size stored entries -> the K = min(k, n)
    best into idx [K] int64 / val [K] float32, best first, ties to the lower entry. Returns K. The cosines are
    computed first, in a loop of their own (its divisions pipeline), then ranked."""
    n = dots.shape[0]
    K = min(k, n)
    cos = np.empty(n, np.float32)                                                # [n]
    for c in range(n):
        d = norm[c] * q_norm
        if d < EPS32:
            d = EPS32
        cos[c] = dots[c] / d
    m = 0
    for c in range(n):
        v = cos[c]
        if m < K or v > val[m - 1]:
            pos = m if m < K else K - 1
            while pos > 0 and val[pos - 1] < v:
                val[pos] = val[pos - 1]
                idx[pos] = idx[pos - 1]
                pos -= 1
            val[pos] = v
            idx[pos] = c
            if m < K:
                m += 1
    return K


@njit
def semantic_step(dots, q, norm, k, idx, val):
    """Embedding q [E] float32, dots [n] = (stored embeddings) @ q, norm [n] theirs -> the K best entries by
    cosine into idx / val (as `top_entries`). Returns K."""
    return top_entries(dots, norm, norm_of(q), k, idx, val)


@njit
def trajectory_step(dot, dots, q, q_sq, prefix_norm, k, idx, val):
    """Layer l routed with probabilities q [J]: dot [n] = (stored maps of layer l) @ q, prefix_norm [n] the
    stored maps' norms over layers 0..l. Adds to the running prefix products dots [n] and squared norm q_sq [1]
    (both float32, kept by the caller) -> the K best entries by prefix cosine into idx / val (as
    `top_entries`). Returns K."""
    for c in range(dots.shape[0]):
        dots[c] += dot[c]
    sq = q * q                                                                   # [J] float32
    q_sq[0] += pairwise_sum(sq, 0, sq.size)
    q_norm = np.float32(np.sqrt(max(q_sq[0], np.float32(0.0))))
    return top_entries(dots, prefix_norm, q_norm, k, idx, val)


@njit
def blend_row(maps, layer, idx, val, K, row):
    """Guiding row [J] of `layer` from the K matches idx / val: the matches' rows weighted by max(score, 0)
    (equal weights when none is positive); K = 1 is the matched row itself. maps [L, C, J] float32."""
    J = row.size
    if K == 1:
        for j in range(J):
            row[j] = maps[layer, idx[0], j]
        return
    w = np.empty(K, np.float32)
    for i in range(K):
        w[i] = max(val[i], np.float32(0.0))
    if pairwise_sum(w, 0, K) <= 0:
        for i in range(K):
            w[i] += np.float32(1.0)
    total = pairwise_sum(w, 0, K)
    for i in range(K):
        w[i] = w[i] / total
    for j in range(J):
        acc = np.float32(0.0)
        for i in range(K):
            acc += w[i] * maps[layer, idx[i], j]
        row[j] = acc


@njit
def delta_choice(row, score, top_k, use_delta, experts):
    """The smallest set of row's most probable experts (ties: lower id) whose float32 running mass reaches
    delta = clip(1 - score, 0, 1) (0 without `use_delta`), never fewer than top_k -> their ids ascending in
    experts [J]; returns how many. A row of non-negative numbers (every probability row) is ranked only as far
    as the set reaches (its running mass never falls); any other row is sorted whole (`_delta_choice_sorted`)."""
    J = row.size
    for j in range(J):
        if not row[j] >= 0:                                                      # negative or NaN
            return _delta_choice_sorted(row, score, top_k, use_delta, experts)
    delta = min(max(1.0 - np.float64(score), 0.0), 1.0) if use_delta else 0.0
    taken = np.zeros(J, np.bool_)                                                # [J]
    mass = np.float32(0.0)
    need = 0
    while need < J:
        best = -1
        for j in range(J):                                                       # the most probable left, lower id
            if not taken[j] and (best < 0 or row[j] > row[best]):
                best = j
        taken[best] = True
        mass = row[best] if need == 0 else mass + row[best]
        need += 1
        if mass >= delta and need >= top_k:
            break
    m = 0
    for j in range(J):
        if taken[j]:
            experts[m] = j
            m += 1
    return need


@njit
def _delta_choice_sorted(row, score, top_k, use_delta, experts):
    """`delta_choice` by a full stable sort: count the running masses below delta over every position."""
    J = row.size
    delta = min(max(1.0 - np.float64(score), 0.0), 1.0) if use_delta else 0.0
    order = np.argsort(-row, kind="mergesort")                                   # [J] stable: ties to lower id
    mass = np.float32(0.0)
    below = 0
    for i in range(J):
        mass = row[order[i]] if i == 0 else mass + row[order[i]]
        if mass < delta:
            below += 1
    need = min(max(below + 1, top_k), J)
    chosen = np.sort(order[:need])
    for i in range(need):
        experts[i] = chosen[i]
    return need


@njit
def plan_row(maps, layer, idx, val, K, top_k, use_delta, row, experts, keys, p):
    """`blend_row` into row [J], then `delta_choice`: the chosen experts' flat keys (layer * J + expert) into
    keys [J] int64 and their guiding probabilities into p [J] float64. Returns how many."""
    blend_row(maps, layer, idx, val, K, row)
    n = delta_choice(row, val[0], top_k, use_delta, experts)
    J = row.size
    for i in range(n):
        keys[i] = layer * J + experts[i]
        p[i] = row[experts[i]]
    return n


@njit
def use_keys(keys, clock, freq, last_used, p, score, rescore):
    """Keys [n] (distinct) were used: clock [1] += 1, then freq += 1, last_used = clock, and score = p * freq
    (rescore 1, pfreq) or freq (rescore 2, lfu); rescore 0 leaves score. All [L*J] float64."""
    clock[0] += 1.0
    now = clock[0]
    for i in range(keys.size):
        k = keys[i]
        freq[k] += 1.0
        last_used[k] = now
        if rescore == 1:
            score[k] = p[k] * freq[k]
        elif rescore == 2:
            score[k] = freq[k]


@njit
def guided_row(maps, layer, idx, val, K, top_k, use_delta, layer_now, row, experts, keys, prio, p, score, freq,
               rescore):
    """One plan applied at once (a policy's `_to_prefetch` of `plan_row`'s plan): plan_row into row / experts /
    keys; the eviction's guiding probability p[layer * J + j] = row[j] for every expert j, and score = p * freq
    where rescore is 1 (pfreq); the chosen experts' prefetch priorities row[e] / max(layer - layer_now, 1) into
    prio [J] float64. p, score, freq [L*J] float64. Returns how many experts were chosen."""
    n = plan_row(maps, layer, idx, val, K, top_k, use_delta, row, experts, keys, prio)
    J = row.size
    base = layer * J
    for j in range(J):
        p[base + j] = row[j]
        if rescore == 1:
            score[base + j] = p[base + j] * freq[base + j]
    dist = np.float64(max(layer - layer_now, 1))
    for i in range(n):
        prio[i] = prio[i] / dist
    return n


@njit
def guided_rows(maps, last, idx, val, K, top_k, use_delta, row, experts, keys, prio, p, score, freq, rescore):
    """`guided_row` for layers 0..last-1 from one match (the semantic guides, before layer 0: layer_now -1),
    their keys and priorities one after another in keys / prio [last * J]. Returns how many in all."""
    J = row.size
    m = 0
    for layer in range(last):
        n = guided_row(maps, layer, idx, val, K, top_k, use_delta, -1, row, experts, keys[m:m + J], prio[m:m + J],
                       p, score, freq, rescore)
        m += n
    return m


@njit
def routed_row(dot, dots, q, q_sq, prefix_norm, k, idx, val, maps, target, top_k, use_delta, layer_now, row,
               experts, keys, prio, p, score, freq, rescore):
    """A routed layer's whole step for one row: `trajectory_step`, then `guided_row` for layer `target`."""
    K = trajectory_step(dot, dots, q, q_sq, prefix_norm, k, idx, val)
    return guided_row(maps, target, idx, val, K, top_k, use_delta, layer_now, row, experts, keys, prio, p, score,
                      freq, rescore)


def warm_up() -> None:
    """Compile (or load from numba's disk cache) every kernel with the types the policy passes."""
    maps = np.ones((2, 2, 3), np.float32)
    norm = np.ones((2, 2), np.float32)
    idx, val = np.zeros(2, np.int64), np.zeros(2, np.float32)
    row, experts = np.zeros(3, np.float32), np.zeros(3, np.int64)
    k = trajectory_step(np.ones(2, np.float32), np.zeros(2, np.float32), np.ones(3, np.float32),
                        np.zeros(1, np.float32), norm[:, 0], 2, idx, val)
    semantic_step(np.ones(2, np.float32), np.ones(3, np.float32), norm[0], 2, idx, val)
    plan_row(maps, 1, idx, val, k, 1, True, row, experts, np.zeros(3, np.int64), np.zeros(3))
    use_keys(np.zeros(1, np.int64), np.zeros(1), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), 1)
    ev = (np.zeros(6), np.zeros(6), np.zeros(6), 1)                               # p, score, freq [L*J], rescore
    keys, prio = np.zeros(6, np.int64), np.zeros(6)
    routed_row(np.ones(2, np.float32), np.zeros(2, np.float32), np.ones(3, np.float32), np.zeros(1, np.float32),
               norm[:, 0], 2, idx, val, maps, 1, 1, True, 0, row, experts, keys, prio, *ev)
    guided_rows(maps, 2, idx, val, k, 1, True, row, experts, keys, prio, *ev)

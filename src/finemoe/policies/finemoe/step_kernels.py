"""FineMoE's per-layer callbacks of a one-row iteration as compiled functions (base.LayerKernels): `use_layer` is
`on_access`, `routed_step` is `on_layer_routed` on the compiled path (planner.observe_applied). The policy's own
callbacks call them, and the simulator's compiled decode loop calls them directly, so both decide alike.

State tuples (built once per iteration by the policy and the planner):
  use_layer:   (J, clock [1], freq, last_used, p, score [L*J] float64, rescore)      EvictionScores.access_state
  routed_step: IterationPlanner.routed_state (see there)
"""
from __future__ import annotations

import numpy as np

from finemoe.jit import njit
from finemoe.policies.finemoe import row_kernels as rk


@njit
def use_layer(layer, experts, counts, state):
    """Layer `layer` uses `experts` [n] (ids within the layer, distinct): EvictionScores.used of their keys."""
    J, clock, freq, last_used, p, score, rescore = state
    rk.use_keys(layer * J + experts, clock, freq, last_used, p, score, rescore)


@njit
def routed_step(layer, top_k, q, dot, state, keys, prio):
    """Layer `layer` routed with the row's probabilities q [J] float32; dot [n] float32 = the store's layer-`layer`
    maps . q (TrajectorySearch.product; read only when a trajectory runs). Records q as the iteration's map row;
    for a layer that guides layer + d, the trajectory step and that layer's plan (rk.routed_row: eviction p set,
    prefetch into keys / prio, returns how many); for a later layer, only the running products grow when kept.
    top_k is not read (the probabilities carry the routing)."""
    (observed, seen, d, L, tracking, keep_dots, dots, q_sq, prefix_norm, k, idx, val, maps, select_k, use_delta,
     row, experts, p, score, freq, rescore) = state
    for j in range(q.size):
        observed[layer, j] = q[j]
    seen[0] += 1
    if not tracking:
        return 0
    target = layer + d
    if target >= L:
        if keep_dots:
            for c in range(dots.size):
                dots[c] += dot[c]
        return 0
    return rk.routed_row(dot, dots, q, q_sq, prefix_norm[:, layer], k, idx, val, maps, target, select_k, use_delta,
                         layer, row, experts, keys, prio, p, score, freq, rescore)


def warm_up() -> None:
    """Compile (or load from numba's disk cache) both with the types the policy passes."""
    L, J, n = 2, 3, 2
    ev = (np.zeros(L * J), np.zeros(L * J), np.zeros(L * J), 1)                   # p, score, freq, rescore
    use_layer(0, np.zeros(1, np.int64), np.ones(1, np.int64), (J, np.zeros(1), ev[2], np.zeros(L * J), ev[0], ev[1],
                                                               1))
    state = (np.zeros((L, J), np.float32), np.zeros(1, np.int64), 1, L, True, True, np.zeros(n, np.float32),
             np.zeros(1, np.float32), np.ones((n, L), np.float32), 2, np.zeros(2, np.int64), np.zeros(2, np.float32),
             np.ones((L, n, J), np.float32), 1, True, np.zeros(J, np.float32), np.zeros(J, np.int64), *ev)
    routed_step(0, np.zeros(1, np.int64), np.ones(J, np.float32), np.ones(n, np.float32), state,
                np.zeros(L * J, np.int64), np.zeros(L * J))

"""Compiled upkeep of one map-store entry: the RDY choice of the entry a new map replaces, and the write of
the map with its norms. The host float32 store's case of map_store.py's numpy path (`MapStore.rdy`, `_write`),
one call each instead of ~25 numpy calls per served iteration.

They do the numpy path's float32 operations in its order (pairwise sums included, row_kernels.pairwise_sum),
so the same entry is replaced and the same norms are stored, to the last bit; tests/test_finemoe_store.py
checks that. The [n, E] x [E] semantic product stays a numpy (BLAS) call in the caller. Shapes: L layers,
J experts, E embedding size, C capacity, n stored entries.
"""
from __future__ import annotations

import numpy as np

from finemoe.jit import njit
from finemoe.policies.finemoe.pairwise import EPS32, norm_of, pairwise_sum


@njit
def rdy_best(map_dots, sem_dots, emap, sem, prefix_norm_last, sem_norm, w_sem, w_map):
    """The stored entry with the highest RDY = w_sem * cos(sem) + w_map * cos(map) (first on a tie), as
    `MapStore.rdy(...).argmax()`. map_dots [n] = new map . each stored map, sem_dots [n] = stored embeddings
    . sem, emap [L*J] and sem [E] the new entry, prefix_norm_last [n] / sem_norm [n] the stored norms;
    all float32, w_sem / w_map float32 (d / L and (L - d) / L)."""
    e_norm = norm_of(emap)
    s_norm = norm_of(sem)
    best, best_v = 0, np.float32(0.0)
    for c in range(map_dots.shape[0]):
        dm = prefix_norm_last[c] * e_norm
        if dm < EPS32:
            dm = EPS32
        ds = sem_norm[c] * s_norm
        if ds < EPS32:
            ds = EPS32
        v = w_sem * (sem_dots[c] / ds) + w_map * (map_dots[c] / dm)
        if c == 0 or v > best_v:
            best, best_v = c, v
    return best


@njit
def write_entry(slot, emap, sem, maps, sems, prefix_sq, prefix_norm, sem_norm):
    """Entry `slot` := map emap [L, J] and embedding sem [E] (float32), with its prefix squared norms and norms
    over layers 0..l (prefix_sq / prefix_norm [C, L]) and its embedding norm (sem_norm [C]), as `_write`.
    maps [L, C, J], sems [C, E] float32."""
    L, J = emap.shape
    sq = np.empty(J, np.float32)
    acc = np.float32(0.0)
    for layer in range(L):
        for j in range(J):
            v = emap[layer, j]
            maps[layer, slot, j] = v
            sq[j] = v * v
        acc = pairwise_sum(sq, 0, J) if layer == 0 else acc + pairwise_sum(sq, 0, J)
        prefix_sq[slot, layer] = acc
        prefix_norm[slot, layer] = np.float32(np.sqrt(max(acc, np.float32(0.0))))
    for e in range(sem.size):
        sems[slot, e] = sem[e]
    sem_norm[slot] = norm_of(sem)


def warm_up() -> None:
    """Compile (or load from numba's disk cache) both kernels with the types the map store passes."""
    f = np.ones(4, np.float32)
    rdy_best(f, f, np.ones(6, np.float32), f[:3], f, f, np.float32(0.25), np.float32(0.75))
    write_entry(0, np.ones((2, 3), np.float32), f[:3], np.zeros((2, 4, 3), np.float32), np.zeros((4, 3), np.float32),
                np.zeros((4, 2), np.float32), np.zeros((4, 2), np.float32), np.zeros(4, np.float32))

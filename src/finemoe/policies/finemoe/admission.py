"""Prefetch admission for the copy-bound regime (beyond the paper; the defaults admit every prefetch).

When decode is bound by host-to-device copies, a prefetch that is not used costs a whole expert copy and
delays the demand misses queued behind it, so fewer, surer prefetches win. Two independent rules:
  max_per_layer N > 0  per engine callback (iteration start, each routed layer, i.e. per layer of compute),
                       of the chosen experts not resident yet request only the N of highest priority
                       (resident ones are free: the cache drops them). N ~ layer time / copy time keeps the
                       prefetch copies hidden under compute, so demand misses never queue behind them.
  cold_p q > 0         a prefetch may displace only a resident expert whose latest guiding probability
                       is below q (a "cold" slot); with none, the prefetch waits (the cache retries it at
                       the next layer, and drops it once its layer has run). Demand misses still evict
                       by the eviction rule.
`cap` is compiled (the planner applies it to each callback's prefetch); cold_p is the eviction rank's prefetch gate
(eviction.py EvictionScores: gate p, limit cold_p), which the cache's kernels read.
"""
from __future__ import annotations


from finemoe.errors import ConfigError
from finemoe.jit import njit


class PrefetchGate:
    def __init__(self, max_per_layer: int = 0, cold_p: float = 0.0) -> None:
        if not isinstance(max_per_layer, int) or isinstance(max_per_layer, bool) or max_per_layer < 0:
            raise ConfigError(f"finemoe option max_prefetch={max_per_layer!r} must be an integer >= 0 (0 = no cap)")
        if not isinstance(cold_p, (int, float)) or isinstance(cold_p, bool) or not 0.0 <= cold_p <= 1.0:
            raise ConfigError(f"finemoe option cold_p={cold_p!r} must be a number in [0, 1] (0 = off)")
        self.max_per_layer = max_per_layer
        self.cold_p = float(cold_p)


@njit
def cap(keys, prio, n, resident, limit):
    """One callback's prefetch keys / prio [:n] -> at most `limit` (> 0) of its keys not resident yet (resident
    [L*J] bool, the cache's live residency), in place: all of them in their order when they fit, else the
    highest priority first (ties: lower key). Returns how many."""
    m = 0
    for i in range(n):                                                           # the absent ones, in order
        if not resident[keys[i]]:
            keys[m], prio[m] = keys[i], prio[i]
            m += 1
    if m <= limit:
        return m
    for i in range(limit):                                                       # selection: the best to the front
        best = i
        for j in range(i + 1, m):
            if prio[j] > prio[best] or (prio[j] == prio[best] and keys[j] < keys[best]):
                best = j
        keys[i], keys[best] = keys[best], keys[i]
        prio[i], prio[best] = prio[best], prio[i]
    return limit

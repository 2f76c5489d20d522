"""A decode iteration's layers in one compiled call, for a policy that offers its callbacks as compiled functions
(base.LayerKernels) over a timed transport.

Per layer, in the replay's order (replay.py): the host round trip, the policy's `access`, the demand
(timed_kernels.demand_timed), the policy's `routed`, the queue (slot_kernels.enqueue), the prefetch issue
(timed_kernels.pump_timed), the layer's compute. The same kernels the per-layer path calls, in the same order,
with the same arguments: only the Python between them is gone. Where the cache needs the policy's
`select_victims` (its rank is not valid, or not asked for yet) the loop stops and hands that step back to the
cache's own Python path, then goes on (`decode_layers`).

The policy's functions are arguments of `layer_loop`. Numba types a compiled function by its object, so a loop
called from Python with them would compile in every process (about 2 s): each built-in pair has a compiled wrapper
(`_SPECIALIZED`) that passes them from compiled code and is cached on disk; any other pair compiles in memory.
"""
from __future__ import annotations

import numpy as np

from finemoe.experts import slot_kernels as sk
from finemoe.jit import njit, njit_in_memory
from finemoe.policies import deepspeed, trackers
from finemoe.policies.base import LayerKernels
from finemoe.policies.finemoe import eviction as finemoe_eviction
from finemoe.policies.finemoe import planner as finemoe_planner
from finemoe.policies.moe_infinity import steps as moe_infinity_steps
from finemoe.policies.oracle import belady
from finemoe.simulator.timed_kernels import demand_timed, pump_timed

DONE, DEMAND, PUMP = 0, 1, 2   # how `layer_loop` stopped: every layer done, or at one layer's demand / pump

_NONE = np.empty(0, np.int64)


@njit
def layer_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, access, access_state, routed, routed_state,
               J, inflight, host_s, step_s, table, K, flags, resident, primary, secondary, control, qprio, qkeys,
               keys, slots, new, clock, done_at, read_until, copy_s, expert_bytes, layer_s, out_keys, out_prio,
               stats):
    """Layers start..L-1 of a one-token iteration: sorted_topk / topk [L, k] int64 (ascending / router order),
    probs [L, J] float32 ([L, 0] when the policy reads none), aux [L, X] float32 (LayerKernels.aux), ones [k].
    `skip_demand`: layer `start`'s access and demand are done already. stats [3] int64 += (hits, misses, prefetch
    copies). Returns (layer, DONE) or (the layer, DEMAND | PUMP) where the cache's Python path must take over."""
    L = topk.shape[0]
    for layer in range(start, L):
        if not (skip_demand and layer == start):
            clock[0] += host_s                       # the host learns the routing; the layer's copies start after
            experts = sorted_topk[layer]
            access(layer, experts, ones, access_state)
            hits = demand_timed(layer * J, experts, table, K, flags, resident, primary, secondary, control, _NONE,
                                slots, new, clock, done_at, read_until, copy_s, expert_bytes, layer_s)
            if hits < 0:
                return layer, DEMAND
            stats[0] += hits
            stats[1] += experts.size - hits
        n = routed(layer, topk[layer], probs[layer], aux[layer], routed_state, out_keys, out_prio)
        if n > 0:
            sk.enqueue(out_keys[:n], out_prio[:n], table, qprio, qkeys)
        if table[table.size - 1] > 0:                # keys queued (ExpertCache.counts[2])
            m = pump_timed((layer + 1) * J, inflight, table, K, flags, resident, primary, secondary, control, qprio,
                           qkeys, keys, slots, clock, done_at, read_until, copy_s, expert_bytes, layer_s)
            if m == sk.NEED_VICTIMS:
                return layer, PUMP
            stats[2] += m
        clock[0] += step_s                           # the layer computes
    return L, DONE


_layer_loop_in_memory = njit_in_memory(getattr(layer_loop, "py_func", layer_loop))   # for any other pair


# One compiled wrapper per built-in pair (numba caches each on disk): the pair is fixed inside, not an argument.
@njit
def _finemoe_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, access_state, routed_state, *rest):
    return layer_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, finemoe_eviction.use_layer, access_state,
                      finemoe_planner.routed_step, routed_state, *rest)


@njit
def _lru_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, access_state, routed_state, *rest):
    return layer_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, trackers.touch_recency, access_state,
                      trackers.no_prefetch, routed_state, *rest)


@njit
def _lfu_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, access_state, routed_state, *rest):
    return layer_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, trackers.touch_frequency, access_state,
                      trackers.no_prefetch, routed_state, *rest)


@njit
def _layer_lru_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, access_state, routed_state, *rest):
    return layer_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, deepspeed.touch_layer, access_state,
                      trackers.no_prefetch, routed_state, *rest)


@njit
def _eam_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, access_state, routed_state, *rest):
    return layer_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, moe_infinity_steps.eam_access,
                      access_state, moe_infinity_steps.eam_routed, routed_state, *rest)


@njit
def _oracle_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, access_state, routed_state, *rest):
    return layer_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, belady.oracle_access, access_state,
                      belady.oracle_routed, routed_state, *rest)


_SPECIALIZED = {(finemoe_eviction.use_layer, finemoe_planner.routed_step): _finemoe_loop,
                (trackers.touch_recency, trackers.no_prefetch): _lru_loop,
                (trackers.touch_frequency, trackers.no_prefetch): _lfu_loop,
                (deepspeed.touch_layer, trackers.no_prefetch): _layer_lru_loop,
                (moe_infinity_steps.eam_access, moe_infinity_steps.eam_routed): _eam_loop,
                (belady.oracle_access, belady.oracle_routed): _oracle_loop}


def decode_layers(cache, transport, kernels: LayerKernels, sorted_topk: np.ndarray, topk: np.ndarray,
                  probs: np.ndarray, ones: np.ndarray, host_s: float, step_s: float,
                  out: tuple[np.ndarray, np.ndarray]) -> tuple[int, int]:
    """Every layer of a one-token iteration through `layer_loop`, the steps it hands back through the cache
    (`acquire_release`, `pump`), which asks the policy for victims. Returns (hits, misses)."""
    stats = np.zeros(3, np.int64)
    layer, skip, L = 0, False, topk.shape[0]
    special = _SPECIALIZED.get((kernels.access, kernels.routed))
    while layer < L:
        rank = cache.current_rank()
        head = (layer, skip, sorted_topk, topk, probs, kernels.aux, ones)
        tail = (cache.J, cache.prefetch_inflight, host_s, step_s, cache.table, cache.K, cache.flags, cache.resident,
                rank.primary, rank.secondary, rank.control, cache.qprio, cache.qkeys, cache.scratch_keys,
                cache.scratch_slots, cache.scratch_new, *transport.kernel_state, *out, stats)
        if special is not None:
            layer, stop = special(*head, kernels.access_state, kernels.routed_state, *tail)
        else:
            layer, stop = _layer_loop_in_memory(*head, kernels.access, kernels.access_state, kernels.routed,
                                                kernels.routed_state, *tail)
        if stop == DEMAND:                           # the access is done: the demand, then this layer's rest
            hits = cache.acquire_release(layer, sorted_topk[layer])
            stats[0] += hits
            stats[1] += sorted_topk.shape[1] - hits
            skip = True
        elif stop == PUMP:
            cache.pump(layer)
            transport.advance(step_s)
            layer, skip = layer + 1, False
    cache.prefetch_copies += int(stats[2])
    return int(stats[0]), int(stats[1])

"""A decode iteration's layers in one compiled call, for a policy that offers its callbacks as compiled functions
(base.LayerKernels) over a timed transport.

Per layer, the layer sequence (engine/layer_sequence.py) compiled: the host round trip, the policy's `access`,
the demand (slot_kernels.demand, then timed_kernels.load), the release (timed_kernels.used, slot_kernels.release),
the policy's `routed`, the queue (slot_kernels.enqueue), the prefetch issue (`pump_timed`: ExpertCache.pump's
sequence), the layer's compute. The same kernels the cache's Python path calls through the timed transport, in
the same order, with the same arguments: only the Python between them is gone. Where the cache needs the
policy's `select_victims` (its rank is not valid, or not asked for yet) the loop stops and hands that step back
to the layer sequence, then goes on (`decode_layers`).

The policy's functions are arguments of `layer_loop`. Numba types a compiled function by its object, so a loop
called from Python with them would compile in every process (about 2 s): each built-in pair has a compiled wrapper
(`_SPECIALIZED`) that passes them from compiled code and is cached on disk; any other pair compiles in memory.
"""
from __future__ import annotations

import numpy as np

from finemoe.engine.layer_sequence import LayerDemand, LayerSequence
from finemoe.experts import slot_kernels as sk
from finemoe.jit import njit, njit_in_memory
from finemoe.policies import deepspeed, trackers
from finemoe.policies.base import LayerKernels
from finemoe.policies.finemoe import eviction as finemoe_eviction
from finemoe.policies.finemoe import planner as finemoe_planner
from finemoe.policies.moe_infinity import steps as moe_infinity_steps
from finemoe.policies.oracle import belady
from finemoe.simulator import timed_kernels as tk

DONE, DEMAND, PUMP = 0, 1, 2   # how `layer_loop` stopped: every layer done, or at one layer's demand / pump


@njit
def pump_timed(st, first, inflight, primary, secondary, control, cc, keys, slots):
    """ExpertCache.pump compiled over the timed transport (queue not empty): drop stale requests, count prefetch
    copies still in flight (finished ones lose their mark), place the best queued keys within the in-flight budget
    and copy them. Returns the copies issued, or NEED_VICTIMS (nothing placed: the cache's pump does it again,
    asking the policy for victims)."""
    sk.drop_stale(st, first)
    m = sk.prefetching_slots(st, slots)
    now = cc.times[0].now
    flying = 0
    for i in range(m):
        s = slots[i]
        if cc.done_at[s] <= now:                     # timed_kernels.finished
            st.flags[s] = st.flags[s] & (255 ^ sk.PREFETCHING)
        else:
            flying += 1
    budget = inflight - flying
    if budget <= 0 or st.tally[0].queued == 0:
        return 0
    n = sk.best_queued(st, budget, keys)
    placed = sk.prefetch(st, keys[:n], primary, secondary, control, keys[:0], slots)
    if placed > 0:
        tk.copy(cc, slots, placed)
    return placed


@njit
def layer_loop(start, skip_demand, sorted_topk, topk, probs, aux, ones, access, access_state, routed, routed_state,
               J, inflight, host_s, step_s, st, primary, secondary, control, cc, keys, slots, new, hit, out_keys,
               out_prio, stats):
    """Layers start..L-1 of a one-token iteration: sorted_topk / topk [L, k] int64 (ascending / router order),
    probs [L, J] float32 ([L, 0] when the policy reads none), aux [L, X] float32 (LayerKernels.aux), ones [k].
    st: the cache's SlotState; cc: the timed transport's CopyClock. `skip_demand`: layer `start`'s access and
    demand are done already. stats [3] int64 += (hits, misses, prefetch copies). Returns (layer, DONE) or
    (the layer, DEMAND | PUMP) where the layer sequence's Python path must take over."""
    L = topk.shape[0]
    times = cc.times[0]
    for layer in range(start, L):
        if not (skip_demand and layer == start):
            times.now += host_s                      # the host learns the routing; the layer's copies start after
            experts = sorted_topk[layer]
            n = experts.size
            access(layer, experts, ones, access_state)
            if sk.demand(st, layer * J, experts, primary, secondary, control, keys[:0], slots, new) < 0:
                return layer, DEMAND
            hits = tk.load(cc, slots[:n], new[:n], hit[:n])
            tk.used(cc, slots, n)                    # ExpertCache.release
            sk.release(st, slots, n)
            stats[0] += hits
            stats[1] += n - hits
        n = routed(layer, topk[layer], probs[layer], aux[layer], routed_state, out_keys, out_prio)
        if n > 0:
            sk.enqueue(st, out_keys[:n], out_prio[:n])
        if st.tally[0].queued > 0:
            m = pump_timed(st, (layer + 1) * J, inflight, primary, secondary, control, cc, keys, slots)
            if m == sk.NEED_VICTIMS:
                return layer, PUMP
            stats[2] += m
        times.now += step_s                          # the layer computes
    return L, DONE


_layer_loop_in_memory = njit_in_memory(layer_loop.py_func)   # for any other pair


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


def decode_layers(sequence: LayerSequence, kernels: LayerKernels, sorted_topk: np.ndarray, topk: np.ndarray,
                  probs: np.ndarray, ones: np.ndarray, out: tuple[np.ndarray, np.ndarray]) -> tuple[int, int]:
    """Every layer of a one-token iteration through `layer_loop`, the steps it hands back through the layer
    sequence (whose cache asks the policy for victims). `sequence` runs over a TimedTransport and a
    SimulatedClock. Returns (hits, misses)."""
    cache, clock = sequence.cache, sequence.clock
    stats = np.zeros(3, np.int64)
    layer, skip, L = 0, False, topk.shape[0]
    special = _SPECIALIZED.get((kernels.access, kernels.routed))
    while layer < L:
        rank = cache.current_rank()
        head = (layer, skip, sorted_topk, topk, probs, kernels.aux, ones)
        tail = (cache.J, cache.prefetch_inflight, clock.host_s, clock.step_s, cache.state, rank.primary,
                rank.secondary, rank.control, cache.transport.state, cache.scratch_keys, cache.scratch_slots,
                cache.scratch_new, cache.scratch_hit, *out, stats)
        if special is not None:
            layer, stop = special(*head, kernels.access_state, kernels.routed_state, *tail)
        else:
            layer, stop = _layer_loop_in_memory(*head, kernels.access, kernels.access_state, kernels.routed,
                                                kernels.routed_state, *tail)
        if stop == DEMAND:                           # the access is done: the demand, then this layer's rest
            step = LayerDemand(layer, sorted_topk[layer], None, None)
            sequence.waves(step)
            hits = int(step.hit.sum())
            stats[0] += hits
            stats[1] += step.hit.size - hits
            skip = True
        elif stop == PUMP:
            sequence.end(layer)
            layer, skip = layer + 1, False
    cache.prefetch_copies += int(stats[2])
    return int(stats[0]), int(stats[1])

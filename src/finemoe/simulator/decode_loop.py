"""A decode iteration's layers in one compiled call, for a policy that offers its callbacks as compiled functions
(base.LayerKernels) over a timed transport.

Per layer, the layer sequence (engine/layer_sequence.py) compiled: the host round trip, the policy's `access`,
the demand (slot_kernels.demand, then timed_kernels.load), the release (timed_kernels.used, slot_kernels.release),
the policy's `routed`, the queue (slot_kernels.enqueue), the prefetch issue (`pump_timed`: ExpertCache.pump's
sequence), the layer's compute. The same kernels the cache's Python path calls through the timed transport, in
the same order, with the same arguments (victims from the policy's live EvictionRank, as there): only the Python
between them is gone. The token's k experts must fit the cache (a layer needing more runs the layer sequence's
waves: the caller's per-layer path). With `--miss-compute cpu|auto` (MissPlan) the layer's absent experts are
split by the engine's own `split_misses` as LayerSequence.begin splits them: only the device half is demanded,
and the layer's compute starts after both the copies and the CPU half (timed_kernels.cpu_half, the hybrid layer's one
rule, which the Python path calls too); under the idle issue rule the CPU half is noted
for copying at the next iteration's start (ExpertCache.begin_iteration), as the cache's Python path notes it.

The policy's functions are arguments of `layer_loop`. Numba types a compiled function by its object, so a loop
called from Python with them would compile in every process (about 2 s): each built-in pair has a compiled wrapper
(`_SPECIALIZED`) that passes them from compiled code and is cached on disk; any other pair compiles in memory.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from finemoe.engine.layer_sequence import LayerSequence
from finemoe.experts import miss_split
from finemoe.experts import slot_kernels as sk
from finemoe.experts.miss_split import GPU, MissCosts
from finemoe.jit import FixedTypes, njit, njit_in_memory
from finemoe.policies import deepspeed, trackers
from finemoe.policies.base import LayerKernels
from finemoe.policies.finemoe import eviction as finemoe_eviction
from finemoe.policies.finemoe import planner as finemoe_planner
from finemoe.policies.moe_infinity import steps as moe_infinity_steps
from finemoe.policies.oracle import belady
from finemoe.simulator import timed_kernels as tk


class MissPlan(NamedTuple):
    """Where a layer's misses run in the compiled loop (experts/miss_split.py), with scratch for k experts."""

    mode: int                # miss_split.GPU | CPU | AUTO
    copy_s: float            # MissCosts, as scalars
    cpu_s: float
    cpu_token_s: float
    cpu_fixed_s: float
    absent: np.ndarray       # int64 [k] positions of the layer's absent experts
    on_cpu: np.ndarray       # bool [k] of those, computed on the CPU
    device: np.ndarray       # int64 [k] the device half's experts, ascending

    @staticmethod
    def of(mode: int, c: MissCosts, k: int) -> MissPlan:
        return MissPlan(mode, c.copy_s, c.cpu_s, c.cpu_token_s, c.cpu_fixed_s, np.zeros(k, np.int64),
                        np.zeros(k, np.bool_), np.zeros(k, np.int64))


@njit
def device_half(st, base, experts, ones, plan, queued_s):
    """LayerSequence.begin's split, compiled (the CPU half noted in the cache's state as cache.note_cpu notes it):
    experts [k] ascending; queued_s the copy engine's queued work (s, used under AUTO). Returns (device experts [n]
    ascending, CPU experts m, seconds of the CPU half)."""
    if plan.mode == GPU:
        return experts, 0, 0.0
    a = 0
    for i in range(experts.size):
        if not st.resident[base + experts[i]]:
            plan.absent[a] = i
            a += 1
    if a == 0:
        return experts, 0, 0.0
    on_cpu = plan.on_cpu[:a]
    miss_split.split_misses(ones[:a], plan.mode, plan.copy_s, plan.cpu_s, plan.cpu_token_s, plan.cpu_fixed_s,
                            queued_s if plan.mode == miss_split.AUTO else 0.0, on_cpu)
    m = 0
    for j in range(a):
        m += on_cpu[j]
    if m == 0:
        return experts, 0, 0.0
    n = 0
    j = 0
    for i in range(experts.size):
        if j < a and plan.absent[j] == i:
            j += 1
            if on_cpu[j - 1]:
                sk.note_cpu(st, base + experts[i])     # ExpertCache.note_cpu
                continue
        plan.device[n] = experts[i]
        n += 1
    return plan.device[:n], m, miss_split.cpu_seconds(ones[:m], plan.cpu_s, plan.cpu_token_s, plan.cpu_fixed_s)


@njit
def _clear_finished(st, cc, slots):
    """Prefetch copies still in flight; finished ones lose their mark (ExpertCache._in_flight, timed)."""
    m = sk.prefetching_slots(st, slots)
    now = cc.times[0].now
    flying = 0
    for i in range(m):
        s = slots[i]
        if cc.done_at[s] <= now:                     # timed_kernels.finished
            st.flags[s] = st.flags[s] & (255 ^ sk.PREFETCHING)
        else:
            flying += 1
    return flying


@njit
def _copy_runs(st, cc, n, demand):
    runs = st.runs
    for i in range(n):
        tk.copy_run(cc, runs.slot[i], runs.lo[i], runs.hi[i], demand)


@njit
def pump_timed(st, first, inflight, rank, cc, keys, slots):
    """ExpertCache.pump compiled over the timed transport (queue not empty, or a prefetch partly issued): drop stale
    requests, count prefetch copies still in flight (finished ones lose their mark); then, by the cache's issue
    rule, place the best queued keys within the in-flight budget and copy them whole (inflight), or place and copy
    the chunks that fit the copy engine's idle bytes (idle: slot_kernels.plan_idle). Returns the prefetches placed."""
    idle = st.issue[0].idle
    if st.tally[0].queued > 0:
        sk.drop_stale(st, first)
    flying = _clear_finished(st, cc, slots)
    if idle:
        n = sk.plan_idle(st, tk.idle_bytes(cc), rank, keys)
        _copy_runs(st, cc, n, False)
        placed = 0
        for i in range(n):
            placed += st.runs.lo[i] == 0
        return placed
    budget = inflight - flying
    if budget <= 0 or st.tally[0].queued == 0:
        return 0
    n = sk.best_queued(st, budget, keys)
    placed = sk.prefetch(st, keys[:n], rank, slots)
    if placed > 0:
        tk.copy(cc, slots, placed)
    return placed


@njit
def layer_loop(sorted_topk, topk, probs, aux, ones, access, access_state, routed, routed_state, J, inflight, host_s,
               step_s, st, rank, cc, keys, slots, new, hit, out_keys, out_prio, plan, stats):
    """Every layer of a one-token iteration: sorted_topk / topk [L, k] int64 (ascending / router order), probs [L, J]
    float32 ([L, 0] when the policy reads none), aux [L, X] float32 (LayerKernels.aux), ones [k]. st: the cache's
    SlotState; rank: the policy's EvictionRank; cc: the timed transport's CopyClock; plan: MissPlan. stats [4] int64
    = (hits, misses, prefetch copies, CPU-computed experts)."""
    times = cc.times[0]
    for layer in range(topk.shape[0]):
        tk.routing_learned(cc, host_s)               # the host learns the routing; copies and CPU half start
        experts = sorted_topk[layer]
        k = experts.size
        access(layer, experts, ones, access_state)
        device, m, cpu_s = device_half(st, layer * J, experts, ones, plan, tk.queued_seconds(cc))
        n = device.size
        sk.demand(st, layer * J, device, rank, slots, new)   # k <= capacity: always room
        if st.issue[0].partial >= 0 and sk.claim_partial(st, slots, n):
            _copy_runs(st, cc, 1, True)              # the rest of a partly issued prefetch, first in line
        hits = tk.load(cc, slots[:n], new[:n], hit[:n])
        if m > 0:                                    # the host ran the CPU half; then the compute (segment) starts
            tk.cpu_half(cc, cpu_s)
        tk.used(cc, slots, n)                        # ExpertCache.release
        sk.release(st, slots, n)
        stats[0] += hits
        stats[1] += k - hits
        stats[3] += m
        n = routed(layer, topk[layer], probs[layer], aux[layer], routed_state, out_keys, out_prio)
        if n > 0:
            sk.enqueue(st, out_keys[:n], out_prio[:n])
        if st.tally[0].queued > 0 or st.issue[0].partial >= 0:
            stats[2] += pump_timed(st, (layer + 1) * J, inflight, rank, cc, keys, slots)
        times.now += step_s                          # the layer computes


_layer_loop_in_memory = njit_in_memory(layer_loop.py_func)   # for any other pair


# One compiled wrapper per built-in pair (numba caches each on disk): the pair is fixed inside, not an argument.
@njit
def _finemoe_loop(sorted_topk, topk, probs, aux, ones, access_state, routed_state, rest):
    return layer_loop(sorted_topk, topk, probs, aux, ones, finemoe_eviction.use_layer, access_state,
                      finemoe_planner.routed_step, routed_state, *rest)


@njit
def _lru_loop(sorted_topk, topk, probs, aux, ones, access_state, routed_state, rest):
    return layer_loop(sorted_topk, topk, probs, aux, ones, trackers.touch_recency, access_state,
                      trackers.no_prefetch, routed_state, *rest)


@njit
def _cycle_lru_loop(sorted_topk, topk, probs, aux, ones, access_state, routed_state, rest):
    return layer_loop(sorted_topk, topk, probs, aux, ones, trackers.touch_cycle, access_state,
                      trackers.no_prefetch, routed_state, *rest)


@njit
def _lfu_loop(sorted_topk, topk, probs, aux, ones, access_state, routed_state, rest):
    return layer_loop(sorted_topk, topk, probs, aux, ones, trackers.touch_frequency, access_state,
                      trackers.no_prefetch, routed_state, *rest)


@njit
def _layer_lru_loop(sorted_topk, topk, probs, aux, ones, access_state, routed_state, rest):
    return layer_loop(sorted_topk, topk, probs, aux, ones, deepspeed.touch_layer, access_state,
                      trackers.no_prefetch, routed_state, *rest)


@njit
def _eam_loop(sorted_topk, topk, probs, aux, ones, access_state, routed_state, rest):
    return layer_loop(sorted_topk, topk, probs, aux, ones, moe_infinity_steps.eam_access,
                      access_state, moe_infinity_steps.eam_routed, routed_state, *rest)


@njit
def _oracle_loop(sorted_topk, topk, probs, aux, ones, access_state, routed_state, rest):
    return layer_loop(sorted_topk, topk, probs, aux, ones, belady.oracle_access, access_state,
                      belady.oracle_routed, routed_state, *rest)


_SPECIALIZED = {(finemoe_eviction.use_layer, finemoe_planner.routed_step): _finemoe_loop,
                (trackers.touch_recency, trackers.no_prefetch): _lru_loop,
                (trackers.touch_cycle, trackers.no_prefetch): _cycle_lru_loop,
                (trackers.touch_frequency, trackers.no_prefetch): _lfu_loop,
                (deepspeed.touch_layer, trackers.no_prefetch): _layer_lru_loop,
                (moe_infinity_steps.eam_access, moe_infinity_steps.eam_routed): _eam_loop,
                (belady.oracle_access, belady.oracle_routed): _oracle_loop}


def decode_layers(sequence: LayerSequence, kernels: LayerKernels, sorted_topk: np.ndarray, topk: np.ndarray,
                  probs: np.ndarray, ones: np.ndarray, out: tuple[np.ndarray, np.ndarray],
                  plan: MissPlan, bound: dict) -> tuple[int, int, int]:
    """Every layer of a one-token iteration through `layer_loop`. `sequence` runs over a TimedTransport and a
    SimulatedClock, with a cache of at least k slots. `bound`: the caller's wrappers bound to its argument types
    (jit.FixedTypes; one dict per replay, whose arguments keep their types from iteration to iteration).
    Returns (hits, misses, CPU-computed experts)."""
    cache, clock = sequence.cache, sequence.clock
    if topk.shape[1] > cache.capacity:
        raise ValueError(f"decode_layers: {topk.shape[1]} experts per layer do not fit {cache.capacity} slots")
    stats = np.zeros(4, np.int64)
    head = (sorted_topk, topk, probs, kernels.aux, ones)
    tail = (cache.J, cache.prefetch_inflight, clock.host_s, clock.step_s, cache.state, cache.rank,
            cache.transport.state, cache.scratch_keys, cache.scratch_slots, cache.scratch_new, cache.scratch_hit,
            *out, plan, stats)
    special = _SPECIALIZED.get((kernels.access, kernels.routed))
    if special is not None:
        loop = bound.get(special)
        if loop is None:
            loop = bound[special] = FixedTypes(special)
        loop(*head, kernels.access_state, kernels.routed_state, tail)
    else:
        _layer_loop_in_memory(*head, kernels.access, kernels.access_state, kernels.routed, kernels.routed_state, *tail)
    cache.prefetch_copies += int(stats[2])
    return int(stats[0]), int(stats[1]), int(stats[3])

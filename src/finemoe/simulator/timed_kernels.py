"""The simulator's demand path in one compiled call: the engine's placement kernel, then the timed copies.

`demand_timed` = ExpertCache.acquire_release over a TimedTransport (placement by slot_kernels.demand, each
miss copied on the one copy engine, the layer waiting for its last copy, the slots marked read by the
layer's compute), with the transport's state in arrays instead of Python calls per expert.
tests/test_simulator_speed.py checks it against the generic path, call for call.
"""
from __future__ import annotations

import functools

import numpy as np

from finemoe.experts import slot_kernels as sk
from finemoe.jit import njit


@njit
def demand_timed(base, experts, table, K, flags, resident, primary, secondary, control, given, slots, new,
                 clock, done_at, read_until, copy_s, expert_bytes, layer_s):
    """Place keys base + experts (slot_kernels.demand, MODE_RELEASE), copy the misses and wait for them.
    clock [now, engine_free, stall, bytes]. Returns the hits, or demand's NEED_VICTIMS / NO_ROOM."""
    status = sk.demand(base, experts, sk.MODE_RELEASE, table, K, flags, resident, primary, secondary, control,
                       given, slots, new)
    if status < 0:
        return status
    now = clock[0]
    ready = now
    hits = 0
    for i in range(experts.size):
        s = slots[i]
        if new[i]:                                   # copied now, behind the copy engine's queue
            end = max(now, clock[1], read_until[s]) + copy_s
            done_at[s] = end
            clock[1] = end
            clock[3] += expert_bytes
            ready = max(ready, end)
        elif done_at[s] <= now:
            hits += 1
        else:                                        # a prefetch still in flight
            ready = max(ready, done_at[s])
    if ready > now:
        clock[2] += ready - now
        clock[0] = ready
    for i in range(experts.size):
        read_until[slots[i]] = clock[0] + layer_s
    return hits


@njit
def pump_timed(first, inflight, table, K, flags, resident, primary, secondary, control, qprio, qkeys, keys, slots,
               clock, done_at, read_until, copy_s, expert_bytes, layer_s):
    """ExpertCache.pump over a TimedTransport: drop stale requests, count prefetch copies still in flight
    (done_at > now), place the best queued keys within the in-flight budget (slot_kernels.prefetch) and copy
    them behind the copy engine's queue. Returns the copies issued, or NEED_VICTIMS (nothing placed)."""
    if sk.drop_stale(first, table, qprio, qkeys) == 0:
        return 0
    flying = 0
    for s in range(flags.size):
        if flags[s] & sk.PREFETCHING:
            if done_at[s] <= clock[0]:
                flags[s] = flags[s] & (255 ^ sk.PREFETCHING)
            else:
                flying += 1
    budget = inflight - flying
    if budget <= 0:
        return 0
    n = sk.best_queued(budget, table, qprio, qkeys, keys)
    m = sk.prefetch(keys[:n], table, K, flags, resident, primary, secondary, control, keys[:0], slots, qprio, qkeys)
    for i in range(max(m, 0)):
        s = slots[i]
        end = max(clock[0], clock[1], read_until[s]) + copy_s
        done_at[s] = end
        clock[1] = end
        clock[3] += expert_bytes
    return m


@functools.cache
def warm_up() -> None:
    """Compile (or load from numba's disk cache) both fused kernels once per process (see slot_kernels)."""
    K, (table, flags, resident, rank, control, none, slots, new, qprio, qkeys) = sk.tiny_state()
    timing = (np.zeros(4), np.zeros(flags.size), np.zeros(flags.size), 0.5, 10.0, 1.0)   # clock, done_at, read_until
    demand_timed(0, np.array([0], np.int64), table, K, flags, resident, rank, rank, control, none, slots, new,
                 *timing)
    pump_timed(0, 1, table, K, flags, resident, rank, rank, control, qprio, qkeys, qkeys.copy(), slots, *timing)

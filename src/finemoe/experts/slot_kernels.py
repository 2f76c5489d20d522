"""The expert cache's slot bookkeeping, compiled (numba): what occupies which slot, and who is evicted.

One call per layer (`demand`) or per prefetch batch (`prefetch`) does the whole placement: look the keys up,
take empty slots (lowest first), then the policy's victims, and update the residency table. Victims are the
evictable occupied slots in ascending (primary[key], secondary[key], slot) order, read from the policy's live
rank arrays (policies/base.py EvictionRank): a scan over the occupied slots, no Python per expert. When the
policy has no valid rank the kernels return NEED_VICTIMS without changing anything, and the cache asks the
policy's `select_victims` and calls again with those victims (`given`). Copies are not started here: the
caller hands each placed expert to its transport (CUDA copies, or the simulator's clock).

The prefetch queue is compiled too: `enqueue` records priorities, `issue` drops stale requests and places the
best ones (highest priority, then lowest key) while room and the in-flight budget last.

State, shared with ExpertCache as numpy views (never reallocated):
  table    int64 [K + N + 3]: slot_of [K] (slot or -1) | key_of [N] (key or -1) | filled | wasted prefetches |
           queued keys
  flags    uint8 [N]: slot state bits below
  resident bool [K]: the live residency the policies read
  qprio    float64 [K]: priority of each queued key, NaN when not queued (priorities are never NaN)
  qkeys    int64 [K]: the queued keys, unordered, in qkeys[:table[-1]]
Slots [0, filled) are occupied (empty slots fill lowest first and a slot never empties again).
"""
from __future__ import annotations

import functools

import numpy as np

from finemoe.jit import njit

PINNED = 1        # read by the layer computing now (acquire .. release): never evicted
UNUSED = 2        # loaded by a prefetch, not used yet
PREFETCHING = 4   # its prefetch copy may still be in flight
COMPUTING = 8     # read by the last released layer's compute, which may still run
HOLD = 16         # (inside `demand` only) holds an expert of the request being placed
DEMAND_BLOCKED = PINNED | HOLD
PREFETCH_BLOCKED = PINNED | UNUSED | PREFETCHING | COMPUTING
NEED_VICTIMS = -1   # the policy's rank is not valid now: call again with `given` victims
NO_ROOM = -2        # fewer evictable slots than a demand needs

MODE_PIN = 0      # acquire: pin the slots until release
MODE_RELEASE = 1  # acquire and release at once: the slots become the computing ones


@njit
def _place(slot, key, table, K, flags, resident):
    """Put `key` in `slot`, evicting its old key (an unused prefetch evicted counts as wasted)."""
    N = flags.size
    old = table[K + slot]
    if old >= 0:
        table[old] = -1
        resident[old] = False
        if flags[slot] & UNUSED:
            table[K + N + 1] += 1
    else:
        table[K + N] += 1
    flags[slot] = flags[slot] & (255 ^ UNUSED ^ PREFETCHING)
    table[K + slot] = key
    table[key] = slot
    resident[key] = True


@njit
def _before(a_slot, b_slot, table, K, primary, secondary):
    """Slot a precedes slot b in the eviction order (ascending primary, secondary, slot)."""
    ka, kb = table[K + a_slot], table[K + b_slot]
    if primary[ka] != primary[kb]:
        return primary[ka] < primary[kb]
    if secondary[ka] != secondary[kb]:
        return secondary[ka] < secondary[kb]
    return a_slot < b_slot


@njit
def rank_victims(n, blocked, limit, table, K, flags, primary, secondary, out, start):
    """Write into out[start:start+m] the m <= n first occupied slots, in eviction order, with no `blocked` flag
    bit and primary[key] < limit. Returns m. Insertion into a sorted list of at most n: O(occupied * n)."""
    N = flags.size
    filled = table[K + N]
    m = 0
    for s in range(filled):
        if flags[s] & blocked:
            continue
        if not primary[table[K + s]] < limit:
            continue
        if m == n:
            if not _before(s, out[start + m - 1], table, K, primary, secondary):
                continue
            m -= 1
        i = start + m
        while i > start and _before(s, out[i - 1], table, K, primary, secondary):
            out[i] = out[i - 1]
            i -= 1
        out[i] = s
        m += 1
    return m


@njit
def demand(base, experts, mode, table, K, flags, resident, primary, secondary, control, given, slots, new):
    """Make keys base + experts (distinct) resident: slots[i] is each one's slot and new[i] whether it was just
    placed (the caller copies it). Present ones stop being unused prefetches. Room for the missing comes from
    empty slots, then victims among slots not pinned (given ones, else the policy's rank when control[1] != 0).
    mode MODE_PIN pins the slots; MODE_RELEASE makes them the computing slots at once (acquire + release).
    Returns the experts placed, NEED_VICTIMS or NO_ROOM (then nothing but the unused marks changed)."""
    n = experts.size
    N = flags.size
    missing = 0
    for i in range(n):
        s = table[base + experts[i]]
        slots[i] = s
        new[i] = False
        if s >= 0:
            flags[s] = (flags[s] & (255 ^ UNUSED)) | HOLD
        else:
            missing += 1
    status = missing
    if missing:
        filled = table[K + N]
        n_empty = min(missing, N - filled)
        need = missing - n_empty
        room = np.empty(missing, np.int64)
        for j in range(n_empty):
            room[j] = filled + j
        if need:
            if given.size:
                if given.size < need:
                    status = NO_ROOM
                else:
                    room[n_empty:] = given[:need]
            elif control[1] != 0.0:
                if rank_victims(need, DEMAND_BLOCKED, np.inf, table, K, flags, primary, secondary,
                                room, n_empty) < need:
                    status = NO_ROOM
            else:
                status = NEED_VICTIMS
        if status >= 0:
            j = 0
            for i in range(n):
                if slots[i] < 0:
                    s = room[j]
                    j += 1
                    _place(s, base + experts[i], table, K, flags, resident)
                    slots[i] = s
                    new[i] = True
    for i in range(n):
        s = slots[i]
        if s >= 0:
            flags[s] = flags[s] & (255 ^ HOLD)
            if status >= 0 and mode == MODE_PIN:
                flags[s] = flags[s] | PINNED
    if status >= 0 and mode == MODE_RELEASE:
        release(slots, n, flags)
    return status


@njit
def release(slots, n, flags):
    """The compute reading slots[:n] was issued: unpin them; they replace the previous computing slots."""
    for s in range(flags.size):
        flags[s] = flags[s] & (255 ^ COMPUTING)
    for i in range(n):
        flags[slots[i]] = (flags[slots[i]] & (255 ^ PINNED)) | COMPUTING


@njit
def prefetch(keys, table, K, flags, resident, primary, secondary, control, given, slots, qprio, qkeys):
    """Place absent `keys` as prefetches, in order, while room lasts: empty slots, then victims among slots
    not pinned, computing, prefetching or unused prefetches (given ones, else the policy's rank with
    primary < control[0]). slots[:m] receive the first m keys, which leave the queue. Returns m, or
    NEED_VICTIMS."""
    n = keys.size
    N = flags.size
    filled = table[K + N]
    n_empty = min(n, N - filled)
    for j in range(n_empty):
        slots[j] = filled + j
    m = n_empty
    if n_empty < n:
        if given.size:
            got = min(given.size, n - n_empty)
            slots[n_empty:n_empty + got] = given[:got]
            m += got
        elif control[1] != 0.0:
            m += rank_victims(n - n_empty, PREFETCH_BLOCKED, control[0], table, K, flags, primary, secondary,
                              slots, n_empty)
        else:
            return NEED_VICTIMS
    for i in range(m):
        _place(slots[i], keys[i], table, K, flags, resident)
        flags[slots[i]] = flags[slots[i]] | PREFETCHING | UNUSED
        _dequeue(keys[i], table, qprio, qkeys)
    return m


@njit
def _dequeue(key, table, qprio, qkeys):
    """Withdraw `key` from the queue if queued (swap-remove: the queue is unordered)."""
    if qprio[key] == qprio[key]:        # not NaN: queued
        qprio[key] = np.nan
        last = table.size - 1
        n = table[last]
        for j in range(n):
            if qkeys[j] == key:
                qkeys[j] = qkeys[n - 1]
                table[last] = n - 1
                break


@njit
def enqueue(keys, priority, table, qprio, qkeys):
    """Queue each key at its priority (a key queued again takes the newer one; -inf withdraws it)."""
    last = table.size - 1
    for i in range(keys.size):
        k = keys[i]
        if priority[i] == -np.inf:
            _dequeue(k, table, qprio, qkeys)
        else:
            if qprio[k] != qprio[k]:        # NaN: not queued yet
                qkeys[table[last]] = k
                table[last] += 1
            qprio[k] = priority[i]


@njit
def clear_queue(table, qprio, qkeys):
    last = table.size - 1
    for j in range(table[last]):
        qprio[qkeys[j]] = np.nan
    table[last] = 0


@njit
def drop_stale(first, table, qprio, qkeys):
    """Drop queued keys below key `first` (their layer is not ahead) or already resident. Returns queue length."""
    last = table.size - 1
    n = table[last]
    j = 0
    for i in range(n):
        k = qkeys[i]
        if k < first or table[k] >= 0:
            qprio[k] = np.nan
        else:
            qkeys[j] = k
            j += 1
    table[last] = j
    return j


@njit
def best_queued(budget, table, qprio, qkeys, out):
    """out[:m] = the m = min(budget, queued) queued keys of highest priority, then lowest key. Returns m."""
    n = table[table.size - 1]
    m = 0
    for i in range(n):
        k = qkeys[i]
        p = qprio[k]
        if m == budget:
            w = out[m - 1]
            if not (p > qprio[w] or (p == qprio[w] and k < w)):
                continue
            m -= 1
        j = m
        while j > 0 and (p > qprio[out[j - 1]] or (p == qprio[out[j - 1]] and k < out[j - 1])):
            out[j] = out[j - 1]
            j -= 1
        out[j] = k
        m += 1
    return m


@njit
def prefetching_slots(flags, out):
    """out[:m] = the slots marked PREFETCHING (copies that may be in flight). Returns m."""
    m = 0
    for s in range(flags.size):
        if flags[s] & PREFETCHING:
            out[m] = s
            m += 1
    return m


def tiny_state() -> tuple[int, tuple]:
    """K and an empty cache's kernel arguments, 4 keys over 2 slots, in the dtypes ExpertCache passes (warm-ups):
    (table, flags, resident, rank, control, no victims, slots, new, qprio, qkeys)."""
    K, N = 4, 2
    table = np.full(K + N + 3, -1, np.int64)
    table[K + N:] = 0
    return K, (table, np.zeros(N, np.uint8), np.zeros(K, bool), np.zeros(K), np.array([np.inf, 1.0]),
               np.empty(0, np.int64), np.zeros(N, np.int64), np.zeros(N, bool), np.full(K, np.nan),
               np.zeros(K, np.int64))


@functools.cache
def warm_up() -> None:
    """Compile (or load from numba's disk cache) every kernel for the argument types the cache passes, once
    per process, so the first request does not pay for it (a fresh checkout compiles for about 10 s)."""
    K, (table, flags, resident, rank, control, none, slots, new, qprio, qkeys) = tiny_state()
    demand(0, np.array([0], np.int64), MODE_PIN, table, K, flags, resident, rank, rank, control, none, slots, new)
    release(slots, 1, flags)
    for writeable in (True, False):   # policies may hand out read-only prefetch arrays (cached plans)
        keys, prio = np.array([2], np.int64), np.array([1.0])
        keys.flags.writeable = prio.flags.writeable = writeable
        enqueue(keys, prio, table, qprio, qkeys)
    drop_stale(0, table, qprio, qkeys)
    best_queued(1, table, qprio, qkeys, qkeys.copy())
    prefetch(np.array([3], np.int64), table, K, flags, resident, rank, rank, control, none, slots, qprio, qkeys)
    prefetching_slots(flags, slots)
    clear_queue(table, qprio, qkeys)

"""The expert cache's slot bookkeeping, compiled (numba): what occupies which slot, and who is evicted.

One call per layer (`demand`) or per prefetch batch (`prefetch`) does the whole placement: look the keys up,
take empty slots (lowest first), then the policy's victims, and update the residency. Victims are the
evictable occupied slots in ascending (primary[key], secondary[key], slot) order, read from the policy's live
rank (policies/base.py EvictionRank, the policy's only eviction decision): a scan over the occupied slots, no
Python per expert. Copies are not started here: the caller hands each placed expert to its transport (CUDA
copies, or the simulator's clock).

The prefetch queue is compiled too: `enqueue` records priorities, `drop_stale` drops requests that are no
longer ahead, `best_queued` picks the best ones (highest priority, then lowest key). Under the `idle` issue rule
(experts/prefetch_issue.py) `plan_idle` places prefetches and cuts their copies into chunk runs that fit a byte
budget; at most one placed prefetch is partly issued (ISSUE.partial), and `claim_partial` hands its remaining chunks
to a demand. Under the idle rule an expert computed on the host CPU (--miss-compute cpu|auto) is noted (`note_cpu`)
and queued at the next iteration's start (`enqueue_cpu_computed`) at CPU_COPY_PRIORITY, below every policy
prefetch: copied for reuse only into the idle copy time the policy's prefetches leave, under the same victim rules.

State: one SlotState (arrays shared with ExpertCache, never reallocated). Slots [0, filled) are occupied
(empty slots fill lowest first and a slot never empties again).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from finemoe.jit import njit
from finemoe.policies.base import EvictionRank

PINNED = 1        # read by the layer computing now (acquire .. release): never evicted
UNUSED = 2        # loaded by a prefetch, not used yet
PREFETCHING = 4   # its prefetch copy may still be in flight
COMPUTING = 8     # read by the last released layer's compute, which may still run
HOLD = 16         # (inside `demand` only) holds an expert of the request being placed
DEMAND_BLOCKED = PINNED | HOLD
PREFETCH_BLOCKED = PINNED | UNUSED | PREFETCHING | COMPUTING
NO_ROOM = -1        # fewer evictable slots than a demand needs
CPU_COPY_PRIORITY = -np.finfo(np.float64).max   # a CPU-computed expert's copy: below every policy prefetch
                                                # (the lowest finite priority; -inf withdraws)

TALLY = np.dtype([("filled", np.int64),    # occupied slots
                  ("wasted", np.int64),    # prefetched experts evicted unused
                  ("queued", np.int64)])   # keys in the prefetch queue

ISSUE = np.dtype([("idle", np.int64),          # 1: the idle issue rule (chunks, idle budget)
                  ("off", np.int64),           # 1: prefetching off (`enqueue` queues nothing)
                  ("gated", np.int64),         # 1: and a prefetch of k evicts only victims with gate < gate[k]
                  ("chunk_bytes", np.int64),   # bytes per prefetch chunk
                  ("expert_bytes", np.int64),  # bytes per expert copy
                  ("partial", np.int64),       # the slot whose prefetch is partly issued, -1 when none
                  ("sent", np.int64),          # bytes of it issued so far
                  ("cpu_noted", np.int64)])    # keys computed on the CPU since the iteration start (cpu_keys)


class CopyRuns(NamedTuple):
    """Copies to issue, byte ranges of experts: run i copies bytes [lo[i], hi[i]) of expert key[i] into slot[i]
    (hi[i] == expert_bytes: the slot's copy is complete once it lands). int64 [N + 1] each."""

    slot: np.ndarray
    key: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @staticmethod
    def empty(num_slots: int) -> CopyRuns:
        return CopyRuns(*(np.zeros(num_slots + 1, np.int64) for _ in range(4)))


class SlotState(NamedTuple):
    """What the cache holds, as the kernels read and write it (K keys = L*J, N slots)."""

    slot_of: np.ndarray    # int64 [K] slot of each key, -1 when not resident
    key_of: np.ndarray     # int64 [N] key in each slot, -1 when empty
    flags: np.ndarray      # uint8 [N] slot state bits (above)
    resident: np.ndarray   # bool [K] the live residency the policies read
    tally: np.ndarray      # TALLY [1]
    qprio: np.ndarray      # float64 [K] priority of each queued key, NaN when not queued (priorities are never NaN)
    qkeys: np.ndarray      # int64 [K] the queued keys, unordered, in qkeys[:queued]
    issue: np.ndarray      # ISSUE [1] the issue rule and its partly issued prefetch
    runs: CopyRuns         # the idle rule's copy runs (plan_idle, claim_partial write them)
    cpu_keys: np.ndarray   # int64 [K] keys computed on the CPU since the iteration start, in [:issue.cpu_noted]

    @staticmethod
    def empty(num_keys: int, num_slots: int, idle: bool = False, chunk_bytes: int = 1,
              expert_bytes: int = 1, gated: bool = False, off: bool = False) -> SlotState:
        issue = np.zeros(1, ISSUE)
        issue[0] = (int(idle), int(off), int(gated), chunk_bytes, expert_bytes, -1, 0, 0)
        return SlotState(np.full(num_keys, -1, np.int64), np.full(num_slots, -1, np.int64),
                         np.zeros(num_slots, np.uint8), np.zeros(num_keys, bool), np.zeros(1, TALLY),
                         np.full(num_keys, np.nan), np.zeros(num_keys, np.int64), issue, CopyRuns.empty(num_slots),
                         np.zeros(num_keys, np.int64))


@njit
def _place(st, slot, key):
    """Put `key` in `slot`, evicting its old key (an unused prefetch evicted counts as wasted)."""
    tally = st.tally[0]
    old = st.key_of[slot]
    if old >= 0:
        st.slot_of[old] = -1
        st.resident[old] = False
        if st.flags[slot] & UNUSED:
            tally.wasted += 1
    else:
        tally.filled += 1
    if st.issue[0].partial == slot:       # its unissued chunks are dropped with it
        st.issue[0].partial = -1
    st.flags[slot] = st.flags[slot] & (255 ^ UNUSED ^ PREFETCHING)
    st.key_of[slot] = key
    st.slot_of[key] = slot
    st.resident[key] = True


@njit
def _before(st, a_slot, b_slot, rank):
    """Slot a precedes slot b in the eviction order (ascending primary, secondary, slot)."""
    primary, secondary = rank.primary, rank.secondary
    ka, kb = st.key_of[a_slot], st.key_of[b_slot]
    if primary[ka] != primary[kb]:
        return primary[ka] < primary[kb]
    if secondary[ka] != secondary[kb]:
        return secondary[ka] < secondary[kb]
    return a_slot < b_slot


@njit
def rank_victims(st, n, blocked, limit, rank, out, start):
    """Write into out[start:start+m] the m <= n first occupied slots, in eviction order, with no `blocked` flag
    bit and rank.gate[key] < limit. Returns m. Insertion into a sorted list of at most n: O(occupied * n)."""
    m = 0
    for s in range(st.tally[0].filled):
        if st.flags[s] & blocked:
            continue
        if not rank.gate[st.key_of[s]] < limit:
            continue
        if m == n:
            if not _before(st, s, out[start + m - 1], rank):
                continue
            m -= 1
        i = start + m
        while i > start and _before(st, s, out[i - 1], rank):
            out[i] = out[i - 1]
            i -= 1
        out[i] = s
        m += 1
    return m


@njit
def demand(st, base, experts, rank, slots, new):
    """Make keys base + experts (distinct) resident and pin them until `release`: slots[i] is each one's slot and
    new[i] whether it was just placed (the caller copies it). The previous layer's compute has finished (the
    caller learned this layer's routing with a host sync): no slot is computing any more. Present experts stop
    being unused prefetches. Room for the missing comes from empty slots, then the policy's victims (`rank`) among
    slots not pinned. Returns the experts placed, or NO_ROOM (then only the computing and unused marks changed)."""
    n = experts.size
    flags = st.flags
    for s in range(flags.size):
        flags[s] = flags[s] & (255 ^ COMPUTING)
    missing = 0
    for i in range(n):
        s = st.slot_of[base + experts[i]]
        slots[i] = s
        new[i] = False
        if s >= 0:
            flags[s] = (flags[s] & (255 ^ UNUSED)) | HOLD
        else:
            missing += 1
    status = missing
    if missing:
        filled = st.tally[0].filled
        n_empty = min(missing, flags.size - filled)
        need = missing - n_empty
        room = np.empty(missing, np.int64)
        for j in range(n_empty):
            room[j] = filled + j
        if need and rank_victims(st, need, DEMAND_BLOCKED, np.inf, rank, room, n_empty) < need:
            status = NO_ROOM
        if status >= 0:
            j = 0
            for i in range(n):
                if slots[i] < 0:
                    s = room[j]
                    j += 1
                    _place(st, s, base + experts[i])
                    slots[i] = s
                    new[i] = True
    for i in range(n):
        s = slots[i]
        if s >= 0:
            flags[s] = flags[s] & (255 ^ HOLD)
            if status >= 0:
                flags[s] = flags[s] | PINNED
    return status


@njit
def release(st, slots, n):
    """The compute reading slots[:n] (placed by the last `demand`, which cleared the previous computing marks) was
    issued: unpin them; they are the computing slots now."""
    flags = st.flags
    for i in range(n):
        flags[slots[i]] = (flags[slots[i]] & (255 ^ PINNED)) | COMPUTING


@njit
def _placed_prefetch(st, slot, key):
    _place(st, slot, key)
    st.flags[slot] = st.flags[slot] | PREFETCHING | UNUSED
    _dequeue(st, key)


@njit
def _prefetch_one(st, key, rank, slots, i):
    """Place absent `key` as a prefetch into an empty slot (lowest first), else the policy's first victim among slots
    not pinned, computing, prefetching or unused prefetches, with gate < limit and, when `gated`, < gate[key]: no
    victim the policy values more than the expert brought in. slots[i] = its slot. Returns whether it found room; a
    placed key leaves the queue."""
    filled = st.tally[0].filled
    limit = rank.limit[0]
    if st.issue[0].gated:
        limit = min(limit, rank.gate[key])
    if filled < st.flags.size:
        slots[i] = filled
    elif rank_victims(st, 1, PREFETCH_BLOCKED, limit, rank, slots, i) == 0:
        return False
    _placed_prefetch(st, slots[i], key)
    return True


@njit
def prefetch(st, keys, rank, slots):
    """Place absent `keys` as prefetches, in order: empty slots, then the policy's victims (`rank`, gate < limit) among
    slots not pinned, computing, prefetching or unused prefetches; the m placed are moved to keys[:m] (in order) with
    their slots in slots[:m]. Under the inflight rule every key has the same victims (one scan; placement stops when
    they run out); under the idle rule each key's own gate may also bound its victims (`_prefetch_one`), so a later
    key may still find room. Returns m."""
    n = keys.size
    if st.issue[0].idle:
        m = 0
        for i in range(n):
            key = keys[i]
            if _prefetch_one(st, key, rank, slots, m):
                keys[m] = key
                m += 1
        return m
    filled = st.tally[0].filled
    n_empty = min(n, st.flags.size - filled)
    for j in range(n_empty):
        slots[j] = filled + j
    m = n_empty
    if n_empty < n:
        m += rank_victims(st, n - n_empty, PREFETCH_BLOCKED, rank.limit[0], rank, slots, n_empty)
    for i in range(m):
        _placed_prefetch(st, slots[i], keys[i])
    return m


@njit
def _advance(st, budget, n):
    """Issue the partly issued prefetch's next chunks while each fits `budget` bytes: one run appended at st.runs[n].
    Returns (runs written, budget left)."""
    iss, runs = st.issue[0], st.runs
    slot, lo = iss.partial, iss.sent
    hi = lo
    while hi < iss.expert_bytes:
        size = min(iss.chunk_bytes, iss.expert_bytes - hi)
        if size > budget:
            break
        budget -= size
        hi += size
    if hi > lo:
        runs.slot[n], runs.key[n], runs.lo[n], runs.hi[n] = slot, st.key_of[slot], lo, hi
        n += 1
        iss.sent = hi
        if hi == iss.expert_bytes:
            iss.partial = -1
    return n, budget


@njit
def plan_idle(st, budget, rank, order):
    """The idle issue rule at a layer boundary (stale requests already dropped): chunks worth at most `budget` bytes
    (the copy engine's predicted idle time before the next demand), first the partly issued prefetch's, then new
    prefetches placed in queue order (highest priority, then lowest key; a key without room stays queued) and
    chunked, until the budget ends (the last one may stay partly issued). Writes st.runs[:n]; returns n.
    order: int64 [K] scratch."""
    iss = st.issue[0]
    n = 0
    if iss.partial >= 0:
        n, budget = _advance(st, budget, n)
        if iss.partial >= 0:
            return n
    q = st.tally[0].queued
    if q == 0 or budget < min(iss.chunk_bytes, iss.expert_bytes):
        return n
    q = best_queued(st, q, order)
    for i in range(q):
        if not _prefetch_one(st, order[i], rank, st.runs.slot, n):
            continue
        iss.partial, iss.sent = st.runs.slot[n], 0
        n, budget = _advance(st, budget, n)
        if iss.partial >= 0 or budget < min(iss.chunk_bytes, iss.expert_bytes):
            break
    return n


@njit
def claim_partial(st, slots, n):
    """A demand acquired slots[:n]: if the partly issued prefetch is among them, its remaining chunks become one
    demand run at st.runs[0] (issued before the demand's own copies) and nothing is partly issued any more.
    Returns the runs written (0 or 1)."""
    iss, runs = st.issue[0], st.runs
    p = iss.partial
    if p < 0:
        return 0
    for i in range(n):
        if slots[i] == p:
            runs.slot[0], runs.key[0], runs.lo[0], runs.hi[0] = p, st.key_of[p], iss.sent, iss.expert_bytes
            iss.partial = -1
            return 1
    return 0


@njit
def prefetching_slots(st, out):
    """out[:m] = the slots marked PREFETCHING (copies that may be in flight). Returns m."""
    m = 0
    for s in range(st.flags.size):
        if st.flags[s] & PREFETCHING:
            out[m] = s
            m += 1
    return m


@njit
def _dequeue(st, key):
    """Withdraw `key` from the queue if queued (swap-remove: the queue is unordered)."""
    if st.qprio[key] == st.qprio[key]:        # not NaN: queued
        st.qprio[key] = np.nan
        tally = st.tally[0]
        n = tally.queued
        for j in range(n):
            if st.qkeys[j] == key:
                st.qkeys[j] = st.qkeys[n - 1]
                tally.queued = n - 1
                break


@njit
def enqueue(st, keys, priority):
    """Queue each key at its priority (a key queued again takes the newer one; -inf withdraws it). Nothing with
    prefetching off."""
    if st.issue[0].off:
        return
    tally = st.tally[0]
    for i in range(keys.size):
        k = keys[i]
        if priority[i] == -np.inf:
            _dequeue(st, k)
        else:
            if st.qprio[k] != st.qprio[k]:        # NaN: not queued yet
                st.qkeys[tally.queued] = k
                tally.queued += 1
            st.qprio[k] = priority[i]


@njit
def note_cpu(st, key):
    """`key` was computed on the host CPU (not copied): under the idle rule, note it for `enqueue_cpu_computed`
    (a key is noted at most once per iteration: its layer begins once)."""
    iss = st.issue[0]
    if iss.idle and iss.cpu_noted < st.cpu_keys.size:
        st.cpu_keys[iss.cpu_noted] = key
        iss.cpu_noted += 1


@njit
def note_cpu_keys(st, keys):
    for i in range(keys.size):
        note_cpu(st, keys[i])


@njit
def enqueue_cpu_computed(st):
    """Queue the keys noted since the last call at CPU_COPY_PRIORITY (a key already queued keeps its priority;
    one the policy queues later takes the policy's) and forget them."""
    iss, tally = st.issue[0], st.tally[0]
    for i in range(iss.cpu_noted):
        k = st.cpu_keys[i]
        if st.qprio[k] != st.qprio[k]:        # NaN: not queued yet
            st.qkeys[tally.queued] = k
            tally.queued += 1
            st.qprio[k] = CPU_COPY_PRIORITY
    iss.cpu_noted = 0


@njit
def clear_queue(st):
    tally = st.tally[0]
    for j in range(tally.queued):
        st.qprio[st.qkeys[j]] = np.nan
    tally.queued = 0


@njit
def drop_stale(st, first):
    """Drop queued keys below key `first` (their layer is not ahead) or already resident. Returns queue length."""
    tally = st.tally[0]
    j = 0
    for i in range(tally.queued):
        k = st.qkeys[i]
        if k < first or st.slot_of[k] >= 0:
            st.qprio[k] = np.nan
        else:
            st.qkeys[j] = k
            j += 1
    tally.queued = j
    return j


@njit
def best_queued(st, budget, out):
    """out[:m] = the m = min(budget, queued) queued keys of highest priority, then lowest key. Returns m."""
    qprio = st.qprio
    m = 0
    for i in range(st.tally[0].queued):
        k = st.qkeys[i]
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


@functools.cache
def warm_up() -> None:
    """Compile (or load from numba's disk cache) every kernel for the argument types the cache passes, once
    per process, so the first request does not pay for it (a fresh checkout compiles for about 10 s)."""
    st = SlotState.empty(4, 2)
    rank = EvictionRank.of(np.zeros(4))
    slots, new = np.zeros(2, np.int64), np.zeros(2, bool)
    demand(st, 0, np.array([0], np.int64), rank, slots, new)
    release(st, slots, 1)
    for writeable in (True, False):   # policies may hand out read-only prefetch arrays (cached plans)
        keys, prio = np.array([2], np.int64), np.array([1.0])
        keys.flags.writeable = prio.flags.writeable = writeable
        enqueue(st, keys, prio)
    drop_stale(st, 0)
    best_queued(st, 1, np.zeros(4, np.int64))
    prefetch(st, np.array([3], np.int64), rank, slots)
    prefetching_slots(st, slots)
    clear_queue(st)
    plan_idle(st, 1.0, rank, np.zeros(4, np.int64))
    claim_partial(st, slots, 1)
    note_cpu_keys(st, np.array([1], np.int64))
    enqueue_cpu_computed(st)

"""The compiled slot bookkeeping (experts/slot_kernels.py): eviction order, placement, prefetch queue."""
from __future__ import annotations

import numpy as np

from finemoe.experts import slot_kernels as sk
from finemoe.policies.base import EvictionRank

K, N = 8, 4


def state(keys_in_slots: list[int]) -> sk.SlotState:
    """A cache of N slots holding `keys_in_slots` (slot i holds keys_in_slots[i])."""
    st = sk.SlotState.empty(K, N)
    for slot, key in enumerate(keys_in_slots):
        st.key_of[slot], st.slot_of[key] = key, slot
        st.resident[key] = True
    st.tally["filled"] = len(keys_in_slots)
    return st


def test_victims_come_in_primary_then_secondary_then_slot_order_skipping_blocked_slots():
    st = state([5, 1, 7, 2])
    primary = np.array([0, 3, 1, 0, 0, 3, 0, 2], float)     # keys 1 and 5 tie on primary
    secondary = np.array([0, 1, 0, 0, 0, 1, 0, 0], float)   # ... and on secondary: slot order decides (5 first)
    rank, out = EvictionRank.of(primary, secondary), np.zeros(N, np.int64)
    assert sk.rank_victims(st, 4, sk.DEMAND_BLOCKED, np.inf, rank, out, 0) == 4
    assert out.tolist() == [3, 2, 0, 1]                     # keys 2 (1.0), 7 (2.0), 5 and 1 (3.0, 1.0)
    st.flags[3] = sk.PINNED
    assert sk.rank_victims(st, 2, sk.DEMAND_BLOCKED, np.inf, rank, out, 0) == 2
    assert out[:2].tolist() == [2, 0]
    assert sk.rank_victims(st, 4, sk.DEMAND_BLOCKED, 2.5, rank, out, 0) == 1   # limit on the gate (here primary)


def test_a_prefetch_evicts_only_keys_whose_gate_is_below_the_limit_in_rank_order():
    st = state([5, 1, 7, 2])
    primary = np.array([0, 3, 1, 0, 0, 3, 0, 2], float)
    gate = np.array([0, 0, 0, 0, 0, 1, 0, 1], float)       # keys 5 and 7 may not be displaced by a prefetch
    rank, slots = EvictionRank.of(primary, gate=gate, limit=np.array([0.5])), np.zeros(N, np.int64)
    sk.enqueue(st, np.array([3, 4, 6]), np.ones(3))
    assert sk.prefetch(st, np.array([3, 4, 6]), rank, slots) == 2   # two victims: 2 (1.0), then 1 (3.0)
    assert slots[:2].tolist() == [3, 1] and st.key_of.tolist() == [5, 4, 7, 3]
    assert st.tally["queued"] == 1 and (st.flags[[3, 1]] & sk.UNUSED).all()


def test_demand_fills_empty_slots_then_evicts_and_counts_an_unused_prefetch_as_wasted():
    st = state([0, 1, 2])
    st.flags[1] = sk.UNUSED                                     # key 1 was prefetched and never used
    rank = EvictionRank.of(np.array([2, 1, 3, 0, 0, 0, 0, 0], float))     # key 1 is the best victim
    slots, new = np.zeros(N, np.int64), np.zeros(N, bool)
    placed = sk.demand(st, 0, np.array([0, 4, 5]), rank, slots, new)
    assert placed == 2 and slots[:3].tolist() == [0, 3, 1] and new[:3].tolist() == [False, True, True]
    assert st.resident.tolist() == [True, False, True, False, True, True, False, False]
    assert st.tally["wasted"] == 1                          # one wasted prefetch
    assert (st.flags[[0, 3, 1]] & sk.PINNED).all()
    sk.release(st, slots, 3)
    assert sk.demand(st, 0, np.array([0, 4, 5, 6, 7]), rank, slots, new) == sk.NO_ROOM   # 5 experts, 4 slots
    assert not st.resident[6] and not (st.flags & sk.PINNED).any()


def test_the_queue_keeps_the_newest_priority_drops_stale_keys_and_issues_the_best_first():
    st, out = state([3]), np.zeros(K, np.int64)
    sk.enqueue(st, np.array([2, 3, 5, 6, 7]), np.array([1.0, 9.0, 2.0, 2.0, 0.5]))
    sk.enqueue(st, np.array([7, 6]), np.array([4.0, -np.inf]))       # 7 raised, 6 withdrawn
    assert sk.drop_stale(st, 4) == 2                         # 2 is below key 4, 3 is resident: dropped
    assert sk.best_queued(st, 5, out) == 2 and out[:2].tolist() == [7, 5]
    sk.clear_queue(st)
    assert st.tally["queued"] == 0 and np.isnan(st.qprio).all()


def test_cpu_computed_keys_queue_at_the_next_start_below_every_policy_prefetch_and_only_under_idle():
    st = sk.SlotState.empty(K, N, idle=True)
    sk.note_cpu_keys(st, np.array([5, 2, 6], np.int64))
    sk.enqueue_cpu_computed(st)
    assert st.issue[0]["cpu_noted"] == 0 and st.tally[0]["queued"] == 3
    sk.enqueue(st, np.array([5, 7], np.int64), np.array([0.1, -1e300]))     # the policy's priority wins for 5
    out = np.zeros(K, np.int64)
    assert sk.best_queued(st, K, out) == 4
    assert out[:4].tolist() == [5, 7, 2, 6]          # policy prefetches first, then the CPU keys (lowest key first)
    inflight = sk.SlotState.empty(K, N)
    sk.note_cpu_keys(inflight, np.array([5], np.int64))
    sk.enqueue_cpu_computed(inflight)
    assert inflight.tally[0]["queued"] == 0

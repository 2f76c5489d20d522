"""The expert cache and the `lru` policy, driven directly with hand-written routing sequences.

Keys are flat: key = layer * J + expert. Every expectation below is worked out by hand in the comments.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finemoe.experts.cache import ExpertCache
from finemoe.experts.host_store import HostExpertStore
from finemoe.experts.transport import PerSlotTransport, SlotPools, SyncTransport, Transport
from finemoe.models.adapters import ExpertGeometry
from finemoe.policies import create_policy
from finemoe.policies.base import PolicyContext, Prefetch

J = 4               # experts per layer
EXPERT_BYTES = 100


class ManualTransport(PerSlotTransport):
    """Copies stay in flight until `finish()`; logs every copy and every compute wait."""

    def __init__(self) -> None:
        self.copies: list[tuple[int, int]] = []   # (slot, key) in issue order
        self.waits: list[list[int]] = []
        self.inflight: set[int] = set()
        self.bytes_copied = 0

    def start_copy(self, slot: int, key: int) -> None:
        self.copies.append((slot, key))
        self.inflight.add(slot)
        self.bytes_copied += EXPERT_BYTES

    def is_done(self, slot: int) -> bool:
        return slot not in self.inflight

    def wait_compute(self, slots: np.ndarray) -> None:
        self.waits.append(sorted(int(s) for s in slots))

    def finish(self) -> None:
        self.inflight.clear()

    def copied_keys(self) -> list[int]:
        return [k for _, k in self.copies]


def geometry(num_layers: int) -> ExpertGeometry:
    return ExpertGeometry(num_layers=num_layers, num_experts=J, top_k=2, expert_bytes=EXPERT_BYTES,
                          param_shapes={"w": (5, 5)}, dtype=torch.float32)


def make_cache(capacity: int, num_layers: int = 3, prefetch_inflight: int = 4, transport: Transport | None = None,
               order: str = "recency"):
    g = geometry(num_layers)
    policy = create_policy("lru", order=order)           # default here: the classic rule, hand-computed below
    transport = transport or ManualTransport()
    cache = ExpertCache(g.total_experts, J, capacity, transport, policy, prefetch_inflight)
    policy.bind(PolicyContext(g, cache.view(), torch.device("cpu")))
    return cache, policy, transport


def access(cache: ExpertCache, policy, layer: int, experts: list[int]) -> np.ndarray:
    """What the runtime does per MoE layer: tell the policy, make the experts resident, compute, release."""
    e = np.array(experts, dtype=np.int64)
    policy.on_access(layer, e, np.ones_like(e))
    res = cache.acquire(layer, e)
    cache.release(res.slots)
    return res.hit


def resident_keys(cache: ExpertCache) -> set[int]:
    return set(np.flatnonzero(cache.resident).tolist())


def test_lru_hits_misses_and_evictions_match_hand_computed_sequence():
    cache, policy, transport = make_cache(capacity=3, num_layers=2)
    # (layer, experts) -> expected hit per expert, resident keys after, keys evicted by this access
    # Clock t counts accesses; LRU evicts the smallest last-use time among residents not used by this access.
    steps = [
        ((0, [0, 1]), [False, False], {0, 1}, set()),        # t1: cold misses k0,k1
        ((1, [2]), [False], {0, 1, 6}, set()),               # t2: k6 cold miss, cache now full
        ((0, [0]), [True], {0, 1, 6}, set()),                # t3: k0 hit (k0=3, k1=1, k6=2)
        ((1, [3]), [False], {0, 6, 7}, {1}),                 # t4: k7 misses, evicts k1 (oldest, t1)
        ((0, [1]), [False], {0, 1, 7}, {6}),                 # t5: k1 misses, evicts k6 (t2 < k0's t3)
        ((1, [3, 2]), [True, False], {1, 6, 7}, {0}),        # t6: k7 hit (pinned), k6 misses, evicts k0 (t3)
        ((0, [1]), [True], {1, 6, 7}, set()),                # t7: k1 hit
        ((0, [0, 2]), [False, False], {0, 1, 2}, {6, 7}),    # t8: two misses evict k6,k7 (t6) and keep k1 (t7)
    ]
    hits = misses = 0
    for (layer, experts), want_hit, want_resident, want_evicted in steps:
        before = resident_keys(cache)
        hit = access(cache, policy, layer, experts)
        transport.finish()                                   # each copy completes before the next layer
        assert hit.tolist() == want_hit, (layer, experts)
        assert resident_keys(cache) == want_resident, (layer, experts)
        assert before - resident_keys(cache) == want_evicted, (layer, experts)
        hits += int(hit.sum())
        misses += int((~hit).sum())
    assert (hits, misses) == (3, 8)
    assert transport.copied_keys() == [0, 1, 6, 7, 1, 6, 0, 2]   # one copy per miss, in miss order
    assert transport.bytes_copied == 8 * EXPERT_BYTES
    assert cache.prefetch_copies == 0 and cache.wasted_prefetches == 0


def test_lru_default_order_counts_visits_of_the_layer_then_the_farthest_next_visit():
    cache, policy, transport = make_cache(capacity=4, num_layers=3, order="cycle")
    # Layers run 0, 1, 2, 0, 1, 2, 0 (one access per tick). stale = visits of the key's layer since its last use
    # that did not use it; among the stalest, the key whose layer runs farthest ahead goes first.
    steps = [
        ((0, [0, 1]), [False, False], set()),     # t1: k0, k1
        ((1, [0]), [False], set()),                # t2: k4
        ((2, [0]), [False], set()),                # t3: k8, cache full
        ((0, [0]), [True], set()),                 # t4: layer 0's 2nd visit without k1: k1 one visit stale
        ((1, [1]), [False], {4}),                  # t5 (mid-iteration): k1 and k4 one visit stale; layer 1 runs
                                                   #     again at t8, layer 0 at t7: k4 goes (classic LRU: k1, t1)
        ((2, [1]), [False], {8}),                  # t6: k1 and k8 stale; layer 2 runs at t9, layer 0 at t7: k8
        ((0, [1]), [True], set()),                 # t7: k1, kept, hits
    ]
    for (layer, experts), want_hit, want_evicted in steps:
        before = resident_keys(cache)
        hit = access(cache, policy, layer, experts)
        transport.finish()
        assert hit.tolist() == want_hit, (layer, experts)
        assert before - resident_keys(cache) == want_evicted, (layer, experts)
    assert resident_keys(cache) == {0, 1, 5, 9}


def test_demand_miss_waits_only_for_its_own_copies():
    cache, policy, transport = make_cache(capacity=4)
    access(cache, policy, 0, [0, 1])
    transport.finish()
    transport.waits.clear()
    access(cache, policy, 0, [1, 2])         # k1 hit (slot 1), k2 miss -> slot 2
    assert transport.waits == [[2]]


def test_sync_transport_copies_the_right_expert_into_the_slot():
    g = ExpertGeometry(2, J, 2, 2 * 3 * 4 + 3 * 4, {"w": (2, 3), "b": (3,)}, torch.float32)
    tensors = [{"w": torch.randn(J, 2, 3), "b": torch.randn(J, 3)} for _ in range(2)]
    store = HostExpertStore(g, tensors, pinned=False)
    pools = SlotPools(store, 2, torch.device("cpu"))
    cache, policy, transport = make_cache(capacity=2, num_layers=2, transport=SyncTransport(store, pools))
    hit = access(cache, policy, 1, [3, 0])
    assert not hit.any()
    for key in (1 * J + 3, 1 * J + 0):
        slot = cache.slot_of[key]
        assert torch.equal(pools.tensors["w"][slot], tensors[1]["w"][key - J])
        assert torch.equal(pools.tensors["b"][slot], tensors[1]["b"][key - J])
    assert transport.bytes_copied == 2 * g.expert_bytes
    assert access(cache, policy, 1, [0]).tolist() == [True]   # sync copies are done at once: a hit


# ---- the prefetch queue ----------------------------------------------------------------------------

def prefetch(keys, priorities) -> Prefetch:
    return Prefetch(np.array(keys, dtype=np.int64), np.array(priorities, dtype=np.float64))


def test_prefetches_issue_in_priority_order_within_the_inflight_limit():
    cache, policy, transport = make_cache(capacity=8, prefetch_inflight=2)
    cache.enqueue(prefetch([J + 0, J + 1, J + 2], [1.0, 3.0, 2.0]))
    assert cache.pump(current_layer=0) == 2
    assert transport.copied_keys() == [J + 1, J + 2]          # highest priority first, limit 2
    assert cache.pump(current_layer=0) == 0                   # both still in flight: nothing more
    transport.finish()
    assert cache.pump(current_layer=0) == 1
    assert transport.copied_keys() == [J + 1, J + 2, J + 0]
    assert cache.prefetch_copies == 3


def test_stale_and_resident_prefetches_are_dropped():
    cache, policy, transport = make_cache(capacity=8)
    access(cache, policy, 2, [0])                             # k8 already resident
    transport.finish()
    transport.copies.clear()
    cache.enqueue(prefetch([0, J + 1, 2 * J + 0, 2 * J + 3], [9.0, 8.0, 7.0, 1.0]))
    cache.pump(current_layer=1)   # layers 0 and 1 have already run in this iteration
    assert transport.copied_keys() == [2 * J + 3]
    transport.finish()
    assert cache.pump(current_layer=1) == 0                   # dropped requests never come back


def test_the_queue_is_emptied_at_iteration_end():
    cache, policy, transport = make_cache(capacity=8)
    cache.enqueue(prefetch([2 * J + 1], [1.0]))
    cache.end_iteration()
    assert cache.pump(current_layer=-1) == 0 and transport.copies == []


def test_equal_priorities_issue_lowest_key_first_and_a_requeued_key_takes_its_newer_priority():
    cache, policy, transport = make_cache(capacity=8, prefetch_inflight=1)
    cache.enqueue(prefetch([J + 3, J + 1, J + 2], [2.0, 2.0, 2.0]))
    cache.enqueue(prefetch([J + 2], [5.0]))                   # queued again: now the best
    cache.pump(current_layer=0)
    transport.finish()
    cache.pump(current_layer=0)
    assert transport.copied_keys() == [J + 2, J + 1]          # then the tie: lower key first


def test_a_minus_infinity_priority_withdraws_a_queued_prefetch():
    cache, policy, transport = make_cache(capacity=8)
    cache.enqueue(prefetch([J + 1, J + 2], [1.0, 2.0]))
    cache.enqueue(prefetch([J + 2], [-np.inf]))
    cache.pump(current_layer=0)
    assert transport.copied_keys() == [J + 1]


def test_demand_miss_is_loaded_before_queued_prefetches_and_not_copied_twice():
    cache, policy, transport = make_cache(capacity=8)
    cache.enqueue(prefetch([J + 0, J + 1], [1.0, 2.0]))       # queued, not yet issued
    hit = access(cache, policy, 1, [0])                      # demand for a queued key
    assert hit.tolist() == [False]
    assert transport.copied_keys() == [J + 0]                 # demand copy goes first
    cache.pump(current_layer=0)
    assert transport.copied_keys() == [J + 0, J + 1]          # k(J+0) is resident now: not copied again


def test_demand_for_an_inflight_prefetch_is_a_miss_that_waits_without_a_second_copy():
    cache, policy, transport = make_cache(capacity=8)
    cache.enqueue(prefetch([J + 2], [1.0]))
    cache.pump(current_layer=0)
    transport.waits.clear()
    hit = access(cache, policy, 1, [2])
    assert hit.tolist() == [False]
    assert transport.copied_keys() == [J + 2]
    assert transport.waits == [[int(cache.slot_of[J + 2])]]
    transport.finish()
    assert access(cache, policy, 1, [2]).tolist() == [True]


def test_a_prefetch_never_evicts_an_unused_prefetched_expert():
    cache, policy, transport = make_cache(capacity=2)
    cache.enqueue(prefetch([J + 0, J + 1], [2.0, 1.0]))
    cache.pump(current_layer=0)
    transport.finish()
    cache.enqueue(prefetch([J + 2], [5.0]))                   # higher priority, but no room it may take
    assert cache.pump(current_layer=0) == 0
    assert resident_keys(cache) == {J + 0, J + 1}
    access(cache, policy, 1, [0])                             # k(J+0) is used: now an ordinary resident
    access(cache, policy, 1, [1])                             # ... and no longer read by the layer computing now
    cache.enqueue(prefetch([J + 2], [5.0]))
    assert cache.pump(current_layer=0) == 1
    assert resident_keys(cache) == {J + 1, J + 2}
    assert cache.wasted_prefetches == 0


def test_a_prefetch_never_evicts_an_expert_the_layer_computing_now_reads():
    """Its copy would wait on the copy stream for that compute, and every demand copy queued behind it too."""
    cache, policy, transport = make_cache(capacity=2)
    access(cache, policy, 0, [0, 1])                          # layer 0 computes with both slots
    cache.enqueue(prefetch([J + 0], [5.0]))
    assert cache.pump(current_layer=0) == 0                   # no slot it may take
    access(cache, policy, 1, [1])                             # demand loads may: J+1 replaces the LRU expert
    assert resident_keys(cache) == {1, J + 1}


def test_a_demand_miss_may_evict_prefetched_experts():
    cache, policy, transport = make_cache(capacity=2, prefetch_inflight=2)
    cache.enqueue(prefetch([J + 0, J + 1], [2.0, 1.0]))
    cache.pump(current_layer=0)
    transport.finish()
    hit = access(cache, policy, 1, [3])                      # neither prefetched expert is wanted
    assert hit.tolist() == [False]
    assert J + 3 in resident_keys(cache)
    assert cache.wasted_prefetches == 1


@pytest.mark.parametrize("done", [True, False], ids=["copies-done", "copies-in-flight"])
def test_a_demand_miss_always_gets_a_slot_even_when_every_slot_was_just_prefetched(done):
    """The cache holds exactly one layer's top-k and both slots hold prefetches nobody wanted:
    the miss must still load (prefetched experts, in flight or not, never block a demand load)."""
    cache, policy, transport = make_cache(capacity=2, prefetch_inflight=2)
    cache.enqueue(prefetch([J + 0, J + 1], [2.0, 1.0]))
    cache.pump(current_layer=0)
    if done:
        transport.finish()
    hit = access(cache, policy, 1, [2, 3])
    assert hit.tolist() == [False, False]
    assert resident_keys(cache) == {J + 2, J + 3}

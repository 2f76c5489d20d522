"""The device expert cache: N preallocated slots, a residency table, demand loads and prefetches.

All bookkeeping is numpy over flat expert keys (key = layer * J + expert). The cache decides what
occupies which slot; the policy picks victims; the transport copies. The simulator drives this same
class with a timed transport, so engine and simulator agree on hits, misses and bytes by construction.

Definitions:
  hit    the expert is resident and its copy had finished when the router asked for it.
  miss   anything else (absent, or still in flight); the layer waits for the copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finemoe.experts.transport import Transport
from finemoe.policies.base import CacheView, Policy, Prefetch


@dataclass
class DemandResult:
    slots: np.ndarray     # [n] slot of each requested expert
    hit: np.ndarray       # [n] bool
    loaded: int           # experts copied on demand


class ExpertCache:
    def __init__(self, total_experts: int, num_experts: int, capacity: int, transport: Transport,
                 policy: Policy, prefetch_inflight: int = 4) -> None:
        self.J = num_experts
        self.capacity = capacity
        self.transport = transport
        self.policy = policy
        self.prefetch_inflight = prefetch_inflight
        self.slot_of = np.full(total_experts, -1, dtype=np.int64)   # [L*J] slot or -1
        self.key_of = np.full(capacity, -1, dtype=np.int64)         # [N] key or -1
        self.in_use = np.zeros(capacity, dtype=bool)                # pinned by the layer computing now
        self.prefetched_unused = np.zeros(capacity, dtype=bool)     # loaded by a prefetch, not yet used
        self.prefetching = np.zeros(capacity, dtype=bool)           # prefetch copy possibly in flight
        self.resident = np.zeros(total_experts, dtype=bool)         # live view handed to policies
        self.pending = np.full(total_experts, -np.inf)              # queued prefetch priority per key
        self.prefetch_copies = 0
        self.wasted_prefetches = 0

    def view(self) -> CacheView:
        return CacheView(self.resident, self.capacity)

    # ---- placement -------------------------------------------------------------------------
    def _assign(self, slot: int, key: int) -> None:
        old = self.key_of[slot]
        if old >= 0:
            self.slot_of[old] = -1
            self.resident[old] = False
            if self.prefetched_unused[slot]:
                self.wasted_prefetches += 1
        self.key_of[slot] = key
        self.slot_of[key] = slot
        self.resident[key] = True
        self.prefetched_unused[slot] = False

    def _free_slots(self, n: int, for_prefetch: bool) -> np.ndarray:
        """Up to n slots to (re)use: empty ones first, then policy victims among evictable residents."""
        empty = np.flatnonzero(self.key_of < 0)[:n]
        if empty.size >= n:
            return empty
        evictable = (self.key_of >= 0) & ~self.in_use
        if for_prefetch:  # a demand load may replace any prefetch (copies into one slot are ordered)
            evictable &= ~self.prefetched_unused & ~self.prefetching
        cand_slots = np.flatnonzero(evictable)
        need = n - empty.size
        if cand_slots.size == 0:
            return empty
        victims = np.asarray(self.policy.select_victims(self.key_of[cand_slots], need, for_prefetch), dtype=np.int64)
        if not for_prefetch and victims.size < need:  # a demand load must get its room
            rest = np.setdiff1d(self.key_of[cand_slots], victims, assume_unique=True)
            victims = np.concatenate([victims, rest[: need - victims.size]])
        return np.concatenate([empty, self.slot_of[victims[:need]]])

    # ---- demand path -------------------------------------------------------------------------
    def acquire(self, layer: int, experts: np.ndarray) -> DemandResult:
        """Make `experts` of `layer` (distinct, len <= capacity) resident and pin them until `release`.
        Misses are copied at once, ahead of any prefetch not yet issued."""
        keys = layer * self.J + experts
        slots = self.slot_of[keys].copy()
        present = slots >= 0
        hit = present.copy()
        for i in np.flatnonzero(present):
            hit[i] = self.transport.is_done(int(slots[i]))
        self.in_use[slots[present]] = True
        self.prefetched_unused[slots[present]] = False
        missing = np.flatnonzero(~present)
        if missing.size:
            room = self._free_slots(missing.size, for_prefetch=False)
            if room.size < missing.size:
                raise RuntimeError(f"expert cache of {self.capacity} slots cannot hold {experts.size} experts at once")
            for i, slot in zip(missing, room):
                self._assign(int(slot), int(keys[i]))
                self.transport.start_copy(int(slot), int(keys[i]))
                self.prefetching[slot] = False
                slots[i] = slot
            self.in_use[room] = True
        self.transport.wait_compute(slots[~hit])
        return DemandResult(slots, hit, int(missing.size))

    def release(self, slots: np.ndarray) -> None:
        self.transport.mark_used(slots)
        self.in_use[slots] = False

    # ---- prefetch path -----------------------------------------------------------------------
    def enqueue(self, prefetch: Prefetch) -> None:
        if len(prefetch):
            self.pending[prefetch.keys] = prefetch.priority

    def pump(self, current_layer: int) -> int:
        """Drop stale requests (layer not ahead of `current_layer`, already resident) and issue the
        best ones while fewer than `prefetch_inflight` prefetch copies are in flight. Returns copies issued."""
        self.pending[: (current_layer + 1) * self.J] = -np.inf
        self.pending[self.resident] = -np.inf
        for s in np.flatnonzero(self.prefetching):
            if self.transport.is_done(int(s)):
                self.prefetching[s] = False
        budget = self.prefetch_inflight - int(self.prefetching.sum())
        if budget <= 0:
            return 0
        queued = np.flatnonzero(self.pending > -np.inf)
        if queued.size == 0:
            return 0
        best = queued[np.argsort(-self.pending[queued], kind="stable")[:budget]]
        room = self._free_slots(best.size, for_prefetch=True)
        issued = 0
        for key, slot in zip(best, room):
            self._assign(int(slot), int(key))
            self.transport.start_copy(int(slot), int(key))
            self.prefetching[slot] = True
            self.prefetched_unused[slot] = True
            self.pending[key] = -np.inf
            issued += 1
        self.prefetch_copies += issued
        return issued

    def end_iteration(self) -> None:
        self.pending[:] = -np.inf

    def load_all(self) -> None:
        """Fill the cache with every expert (resident policy): capacity must equal L*J."""
        for key in range(self.slot_of.size):
            self._assign(key, key)
            self.transport.start_copy(key, key)

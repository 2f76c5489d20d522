"""The device expert cache: N preallocated slots, a residency table, demand loads and prefetches.

Keys are flat (key = layer * J + expert). Whole-cache work (eviction candidates, the residency table
policies read) is numpy over keys and slots; the per-layer work on the few experts a layer routes to, and
the prefetch queue (a few keys per layer plan), is plain Python over int lists, small sets and a dict,
where numpy's per-call overhead would dominate (the simulator replays millions of layer steps through
this class). The cache decides what occupies which slot; the policy picks victims; the transport
copies. The simulator drives this same class with a timed transport, so engine and simulator agree on
hits, misses and bytes by construction.

Definitions:
  hit    the expert is resident and its copy had finished when the router asked for it.
  miss   anything else (absent, or still in flight); the layer waits for the copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from finemoe.experts.transport import Transport
from finemoe.policies.base import CacheView, Policy, Prefetch, VictimOrder


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
        self.slot_of = np.full(total_experts, -1, dtype=np.int64)   # [L*J] slot or -1 (read-only outside)
        self.key_of = np.full(capacity, -1, dtype=np.int64)         # [N] key or -1
        self.resident = np.zeros(total_experts, dtype=bool)         # live view handed to policies
        self.queue: dict[int, float] = {}       # queued prefetch: key -> priority (a few keys per layer plan)
        self._slot = [-1] * total_experts       # slot_of as Python ints (scalar hot path)
        self._key = [-1] * capacity             # key_of as Python ints
        # scalar writes into the numpy views go through memoryviews of the same buffers (numpy's own scalar
        # indexing costs several times more per element)
        self._views = (memoryview(self.slot_of), memoryview(self.key_of), memoryview(self.resident))
        self._filled = 0                        # slots [0, filled) hold experts: empty slots fill lowest first
        self._all_slots = np.ones(capacity, dtype=bool)
        self._pinned: set[int] = set()          # slots in use by the layer computing now (acquire .. release)
        self._unused_prefetch: set[int] = set()  # slots loaded by a prefetch, not yet used
        self._prefetching: set[int] = set()     # slots whose prefetch copy may still be in flight
        self._computing: set[int] = set()       # slots the last released layer's compute may still read
        self._marks_use = type(transport).mark_used is not Transport.mark_used
        self._order: VictimOrder | None = None   # the policy's incremental eviction order (asked at first eviction)
        self._order_asked = False
        self.prefetch_copies = 0
        self.wasted_prefetches = 0

    def view(self) -> CacheView:
        return CacheView(self.resident, self.capacity)

    # ---- placement -------------------------------------------------------------------------
    def _assign(self, slot: int, key: int) -> None:
        old = self._key[slot]
        slot_of, key_of, resident = self._views
        if old >= 0:
            self._slot[old] = -1
            slot_of[old] = -1
            resident[old] = False
            if slot in self._unused_prefetch:
                self.wasted_prefetches += 1
                self._unused_prefetch.discard(slot)
        else:
            self._filled += 1
        self._key[slot] = key
        key_of[slot] = key
        self._slot[key] = slot
        slot_of[key] = slot
        resident[key] = True
        if self._order is not None:
            self._order.placed(slot, key, old)

    def _free_slots(self, n: int, for_prefetch: bool, pinned_now: list[int] | None = None) -> list[int]:
        """Up to n slots to (re)use: empty ones first, then policy victims among evictable residents.
        `pinned_now`: slots the acquire in progress uses (never evicted, like `_pinned` ones)."""
        empty = list(range(self._filled, min(self._filled + n, self.capacity)))
        if len(empty) >= n:
            return empty
        if not self._order_asked:
            self._order_asked = True
            self._order = self.policy.victim_order()
            if self._order is not None:
                self._order.attach(self._key, self._slot)
        if self._order is not None:   # same victims as select_victims, without the candidate array
            blocked = set(pinned_now) if pinned_now else set()
            if self._pinned:
                blocked |= self._pinned
            if for_prefetch:
                blocked |= self._unused_prefetch
                blocked |= self._prefetching
                blocked |= self._computing
            victims = self._order.victims(n - len(empty), for_prefetch, blocked)
            if victims is not None and (for_prefetch or len(victims) == n - len(empty)):
                return empty + victims
        evictable = self._all_slots.copy() if self._filled == self.capacity else self.key_of >= 0   # [N]
        if pinned_now:
            evictable[pinned_now] = False
        blocked = ((self._pinned, self._unused_prefetch, self._prefetching, self._computing) if for_prefetch
                   else (self._pinned,))
        for slots in blocked:  # a demand load may replace any prefetch (copies into one slot are ordered)
            if slots:
                evictable[list(slots)] = False
        candidates = self.key_of[evictable]                          # keys, in slot order
        if candidates.size == 0:
            return empty
        need = n - len(empty)
        victims = np.asarray(self.policy.select_victims(candidates, need, for_prefetch), dtype=np.int64)
        if not for_prefetch and victims.size < need:  # a demand load must get its room
            rest = np.setdiff1d(candidates, victims, assume_unique=True)
            victims = np.concatenate([victims, rest[: need - victims.size]])
        slot_of = self._slot
        return empty + [slot_of[k] for k in victims[:need].tolist()]

    # ---- demand path -------------------------------------------------------------------------
    def acquire(self, layer: int, experts: np.ndarray) -> DemandResult:
        """Make `experts` of `layer` (distinct, len <= capacity) resident and pin them until `release`.
        Misses are copied at once, ahead of any prefetch not yet issued. The caller has learned this
        layer's routing with a host sync, so the previous layer's compute has finished: its slots are
        no longer `_computing` (the pinned ones of this layer take that role until `release`)."""
        self._computing = set()
        slots, hit, loaded = self._acquire(layer, experts)
        self._pinned.update(slots)
        return DemandResult(np.array(slots, dtype=np.int64), np.array(hit, dtype=bool), loaded)

    def release(self, slots: np.ndarray) -> None:
        """The layer's compute that reads `slots` has been issued. Until the next release a prefetch does not
        evict them: its copy would wait on the copy stream for that compute, and every copy behind it too."""
        self.transport.mark_used(slots)
        used = slots.tolist()
        self._pinned.difference_update(used)
        self._computing = set(used)

    def acquire_release(self, layer: int, experts: np.ndarray) -> int:
        """`acquire` then `release` at once, for a driver that models the layer's compute elsewhere (the
        simulator): the same placement, copies and waits, without building arrays. Returns the hits."""
        slots, hit, _ = self._acquire(layer, experts)
        if self._marks_use:
            self.transport.mark_used(np.array(slots, dtype=np.int64))
        if self._pinned:
            self._pinned.difference_update(slots)
        self._computing = set(slots)
        return sum(hit)

    def _acquire(self, layer: int, experts: np.ndarray) -> tuple[list[int], list[bool], int]:
        """The demand path (pins nothing past its own eviction choice) -> (slot of each expert, hit of each
        expert, experts copied on demand). Python over the layer's few experts: no array per call."""
        base = layer * self.J
        slot_of = self._slot
        keys = [base + e for e in experts.tolist()]
        slots = [slot_of[k] for k in keys]
        is_done = self.transport.is_done
        hit = [s >= 0 and is_done(s) for s in slots]
        loaded = 0
        if -1 in slots:
            present = [s for s in slots if s >= 0]
            missing = [i for i, s in enumerate(slots) if s < 0]
            if self._unused_prefetch:
                self._unused_prefetch.difference_update(present)
            room = self._free_slots(len(missing), False, present)
            if len(room) < len(missing):
                raise RuntimeError(f"expert cache of {self.capacity} slots cannot hold {experts.size} experts at once")
            start_copy, prefetching = self.transport.start_copy, self._prefetching
            for i, slot in zip(missing, room):
                self._assign(slot, keys[i])
                start_copy(slot, keys[i])
                prefetching.discard(slot)
                slots[i] = slot
            loaded = len(missing)
        elif self._unused_prefetch:
            self._unused_prefetch.difference_update(slots)
        if not all(hit):
            self.transport.wait_compute(np.array([s for s, h in zip(slots, hit) if not h], dtype=np.int64))
        return slots, hit, loaded

    # ---- prefetch path -----------------------------------------------------------------------
    def enqueue(self, prefetch: Prefetch) -> None:
        """Queue `prefetch`: each key at its priority (a key queued again takes the newer priority; -inf
        withdraws it). Plain Python over the few keys of a layer plan."""
        if not len(prefetch):
            return
        queue = self.queue
        for key, priority in zip(prefetch.keys.tolist(), prefetch.priority.tolist()):
            if priority == -math.inf:
                queue.pop(key, None)
            else:
                queue[key] = priority

    def pump(self, current_layer: int) -> int:
        """Drop stale requests (layer not ahead of `current_layer`, already resident) and issue the
        best ones (highest priority, then lowest key) while fewer than `prefetch_inflight` prefetch copies
        are in flight. Returns copies issued. With nothing queued there is nothing to drop or issue: return
        at once (which prefetch copies have finished is asked when it matters; a finished copy stays finished)."""
        queue = self.queue
        if not queue:
            return 0
        first, slot_of = (current_layer + 1) * self.J, self._slot
        for key in [k for k in queue if k < first or slot_of[k] >= 0]:
            del queue[key]
        if self._prefetching:
            is_done = self.transport.is_done
            self._prefetching.difference_update([s for s in self._prefetching if is_done(s)])
        budget = self.prefetch_inflight - len(self._prefetching)
        if budget <= 0 or not queue:
            return 0
        best = sorted(queue, key=lambda k: (-queue[k], k))[:budget]
        return self._start_prefetches(best)

    def _start_prefetches(self, keys: list[int]) -> int:
        """Copy `keys` (not resident) into slots now, as prefetches; returns how many found room."""
        room = self._free_slots(len(keys), for_prefetch=True)
        queue = self.queue
        for key, slot in zip(keys, room):
            self._assign(slot, key)
            self.transport.start_copy(slot, key)
            self._prefetching.add(slot)
            self._unused_prefetch.add(slot)
            queue.pop(key, None)
        self.prefetch_copies += len(room)
        return len(room)

    def prefetch_now(self, keys: np.ndarray) -> int:
        """Start copying the non-resident `keys` (in the given order) at once, outside the prefetch queue
        and its in-flight limit, behind the demand copies already issued (prefill lookahead). Victims come
        from the policy among slots that are neither in use nor unused prefetches. Returns copies issued."""
        missing = keys[~self.resident[keys]]
        return self._start_prefetches(missing.tolist()) if missing.size else 0

    def end_iteration(self) -> None:
        self.queue.clear()

    def load_all(self) -> None:
        """Fill the cache with every expert (resident policy): capacity must equal L*J."""
        for key in range(self.slot_of.size):
            self._assign(key, key)
            self.transport.start_copy(key, key)

"""The device expert cache: N preallocated slots, a residency table, demand loads and prefetches.

Keys are flat (key = layer * J + expert). What occupies which slot, and who is evicted, is decided by
compiled kernels (slot_kernels.py) over numpy state: one call per layer, no Python per expert, victims
read from the policy's live rank arrays (EvictionRank) or, for a policy without one, from its
`select_victims`. This class drives them, hands each placed expert to the transport (which copies) and
keeps the prefetch queue (a few keys per layer plan, a dict). The simulator drives this same class with a
timed transport, so engine and simulator agree on hits, misses and bytes by construction.

Definitions:
  hit    the expert is resident and its copy had finished when the router asked for it.
  miss   anything else (absent, or still in flight); the layer waits for the copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finemoe.experts import slot_kernels as sk
from finemoe.experts.transport import Transport
from finemoe.policies.base import CacheView, EvictionRank, Policy, Prefetch

_NONE = np.empty(0, np.int64)
_NO_RANK = EvictionRank(np.zeros(1), np.zeros(1), np.array([np.inf, 0.0]))   # "ask select_victims"


@dataclass
class DemandResult:
    slots: np.ndarray     # [n] slot of each requested expert
    hit: np.ndarray       # [n] bool
    loaded: int           # experts copied on demand


class ExpertCache:
    def __init__(self, total_experts: int, num_experts: int, capacity: int, transport: Transport,
                 policy: Policy, prefetch_inflight: int = 4) -> None:
        sk.warm_up()
        self.J = num_experts
        self.K = total_experts
        self.capacity = capacity
        self.transport = transport
        self.policy = policy
        self.prefetch_inflight = prefetch_inflight
        K, N = total_experts, capacity
        self.table = np.full(K + N + 3, -1, dtype=np.int64)   # slot_of | key_of | filled, wasted, queued (kernels)
        self.counts = self.table[K + N:]                      # [3] filled slots, wasted prefetches, queued keys
        self.counts[:] = 0
        self.slot_of = self.table[:K]                         # [L*J] slot or -1 (read-only outside)
        self.key_of = self.table[K:K + N]                     # [N] key or -1
        self.flags = np.zeros(capacity, dtype=np.uint8)              # [N] slot state bits (slot_kernels)
        self.resident = np.zeros(total_experts, dtype=bool)          # live view handed to policies
        self.qprio = np.full(K, np.nan)                       # [L*J] queued prefetch priority, NaN = not queued
        self.qkeys = np.zeros(K, np.int64)                    # [L*J] the queued keys in qkeys[:counts[2]]
        self.scratch_slots = np.empty(max(capacity, 1), np.int64)    # kernel outputs, reused (by compiled drivers too)
        self.scratch_keys = np.empty(K, np.int64)
        self._flying = np.empty(max(capacity, 1), np.int64)
        self._flags = memoryview(self.flags)                  # scalar writes
        self.scratch_new = np.empty(max(capacity, 1), bool)
        self._marks_use = type(transport).mark_used is not Transport.mark_used
        self._fused = getattr(transport, "fused_demand", None)       # the simulator's compiled demand + copies
        self._fused_pump = getattr(transport, "fused_pump", None)    # ... and prefetch issue + copies
        self._rank: EvictionRank | None = None   # the policy's eviction rank (asked at first eviction)
        self._admit_none = EvictionRank(np.zeros(K), np.zeros(K), np.array([-np.inf, 1.0]))   # a rank with no victim
        self.prefetch_copies = 0

    @property
    def wasted_prefetches(self) -> int:
        return int(self.counts[1])

    def view(self) -> CacheView:
        return CacheView(self.resident, self.capacity)

    # ---- victims -----------------------------------------------------------------------------
    def current_rank(self) -> EvictionRank:
        """The policy's rank, asked once the cache is full (before that, victims are rare: select_victims). A
        compiled driver passes its arrays to the kernels (invalid: they return NEED_VICTIMS and change nothing)."""
        if self._rank is None:
            if self.counts[0] < self.capacity:
                return _NO_RANK
            self._rank = self.policy.eviction_rank() or _NO_RANK
        return self._rank

    def _policy_victims(self, n: int, for_prefetch: bool, held: list[int] | None = None) -> np.ndarray:
        """The policy's `select_victims` over the evictable occupied slots -> up to n victim slots (exactly n
        for a demand load while enough are evictable: the first other candidates make up a shortfall)."""
        filled = int(self.counts[0])
        blocked = sk.PREFETCH_BLOCKED if for_prefetch else sk.PINNED
        evictable = (self.flags[:filled] & blocked) == 0                # [filled]
        if held:
            evictable[held] = False
        candidates = self.key_of[:filled][evictable]                   # keys, in slot order
        if candidates.size == 0:
            return _NONE
        victims = np.asarray(self.policy.select_victims(candidates, n, for_prefetch), dtype=np.int64)
        if not for_prefetch and victims.size < n:  # a demand load must get its room
            rest = np.setdiff1d(candidates, victims, assume_unique=True)
            victims = np.concatenate([victims, rest[: n - victims.size]])
        return self.slot_of[victims[:n]]

    def _demand_victims(self, n: int) -> np.ndarray:
        """After `demand` returned NEED_VICTIMS for n experts (self.scratch_slots holds the present ones' slots): the
        policy's victims for the missing ones beyond the empty slots (raises if too few slots are evictable)."""
        held = [s for s in self.scratch_slots[:n].tolist() if s >= 0]
        need = n - len(held) - (self.capacity - int(self.counts[0]))
        victims = self._policy_victims(need, False, held)
        if victims.size < need:
            raise RuntimeError(f"expert cache of {self.capacity} slots cannot hold {n} experts at once")
        return victims

    # ---- demand path -------------------------------------------------------------------------
    def acquire(self, layer: int, experts: np.ndarray) -> DemandResult:
        """Make `experts` of `layer` (distinct, len <= capacity) resident and pin them until `release`.
        Misses are copied at once, ahead of any prefetch not yet issued. The caller has learned this
        layer's routing with a host sync, so the previous layer's compute has finished: its slots are
        no longer computing (the pinned ones of this layer take that role until `release`)."""
        sk.release(_NONE, 0, self.flags)   # no slot is computing (clears the marks only)
        slots, hit, loaded = self._acquire(layer, experts, sk.MODE_PIN)
        return DemandResult(np.array(slots, dtype=np.int64), np.array(hit, dtype=bool), loaded)

    def release(self, slots: np.ndarray) -> None:
        """The layer's compute that reads `slots` has been issued. Until the next release a prefetch does not
        evict them: its copy would wait on the copy stream for that compute, and every copy behind it too."""
        self.transport.mark_used(slots)
        sk.release(slots.astype(np.int64, copy=False), slots.size, self.flags)

    def acquire_release(self, layer: int, experts: np.ndarray) -> int:
        """`acquire` then `release` at once, for a driver that models the layer's compute elsewhere (the
        simulator): the same placement, copies and waits, without building arrays. Returns the hits. A
        transport with a `fused_demand` kernel (the simulator's clock) does it all in one compiled call."""
        if self._fused is None:
            slots, hit, _ = self._acquire(layer, experts, sk.MODE_RELEASE)
            if self._marks_use:
                self.transport.mark_used(np.array(slots, dtype=np.int64))
            return sum(hit)
        rank = self.current_rank()
        args = (layer * self.J, experts, self.table, self.K, self.flags, self.resident, rank.primary,
                rank.secondary, rank.control)
        hits = int(self._fused(*args, _NONE, self.scratch_slots, self.scratch_new, *self.transport.kernel_state))
        if hits == sk.NEED_VICTIMS:
            hits = int(self._fused(*args, self._demand_victims(experts.size), self.scratch_slots, self.scratch_new,
                                   *self.transport.kernel_state))
        if hits == sk.NO_ROOM:
            raise RuntimeError(f"expert cache of {self.capacity} slots cannot hold {experts.size} experts at once")
        return hits

    def _acquire(self, layer: int, experts: np.ndarray, mode: int) -> tuple[list[int], list[bool], int]:
        """The demand path -> (slot of each expert, hit of each expert, experts copied on demand). One kernel
        call places every miss; Python only over the misses' copies and the present ones' copy state."""
        rank = self.current_rank()
        args = (layer * self.J, experts, mode, self.table, self.K, self.flags, self.resident,
                rank.primary, rank.secondary, rank.control)
        n = experts.size
        loaded = int(sk.demand(*args, _NONE, self.scratch_slots, self.scratch_new))
        if loaded == sk.NEED_VICTIMS:
            loaded = int(sk.demand(*args, self._demand_victims(n), self.scratch_slots, self.scratch_new))
        if loaded == sk.NO_ROOM:
            raise RuntimeError(f"expert cache of {self.capacity} slots cannot hold {n} experts at once")
        slots = self.scratch_slots[:n].tolist()
        is_done = self.transport.is_done
        if loaded:
            new = self.scratch_new[:n].tolist()
            hit = [not w and is_done(s) for s, w in zip(slots, new)]
            start_copy, base = self.transport.start_copy, layer * self.J
            for e, s, w in zip(experts.tolist(), slots, new):
                if w:
                    start_copy(s, base + e)
        else:
            hit = [is_done(s) for s in slots]
        if not all(hit):
            self.transport.wait_compute(np.array([s for s, h in zip(slots, hit) if not h], dtype=np.int64))
        return slots, hit, loaded

    # ---- prefetch path -----------------------------------------------------------------------
    def enqueue(self, prefetch: Prefetch) -> None:
        """Queue `prefetch`: each key at its priority (a key queued again takes the newer priority; -inf
        withdraws it)."""
        if len(prefetch):
            sk.enqueue(prefetch.keys.astype(np.int64, copy=False), prefetch.priority.astype(np.float64, copy=False),
                       self.table, self.qprio, self.qkeys)

    def pump(self, current_layer: int) -> int:
        """Drop stale requests (layer not ahead of `current_layer`, already resident) and issue the
        best ones (highest priority, then lowest key) while fewer than `prefetch_inflight` prefetch copies
        are in flight. Returns copies issued. With nothing queued there is nothing to drop or issue: return
        at once (which prefetch copies have finished is asked when it matters; a finished copy stays finished)."""
        if not self.counts[2]:
            return 0
        if self._fused_pump is not None:
            rank = self.current_rank()
            m = self._fused_pump((current_layer + 1) * self.J, self.prefetch_inflight, self.table, self.K, self.flags,
                                 self.resident, rank.primary, rank.secondary, rank.control, self.qprio, self.qkeys,
                                 self.scratch_keys, self.scratch_slots, *self.transport.kernel_state)
            m = int(m)
            if m != sk.NEED_VICTIMS:
                self.prefetch_copies += m
                return m
        sk.drop_stale((current_layer + 1) * self.J, self.table, self.qprio, self.qkeys)
        budget = self.prefetch_inflight - self._in_flight()
        if budget <= 0 or not self.counts[2]:
            return 0
        m = int(sk.best_queued(budget, self.table, self.qprio, self.qkeys, self.scratch_keys))
        return self._start_prefetches(self.scratch_keys[:m].copy())

    def _in_flight(self) -> int:
        """Prefetch copies still in flight; finished ones lose their mark (a finished copy stays finished)."""
        m = int(sk.prefetching_slots(self.flags, self._flying))
        if not m:
            return 0
        is_done, flags, keep = self.transport.is_done, self._flags, 255 ^ sk.PREFETCHING
        for s in self._flying[:m].tolist():
            if is_done(s):
                flags[s] &= keep
                m -= 1
        return m

    def _start_prefetches(self, keys: np.ndarray) -> int:
        """Copy `keys` (int64, not resident) into slots now, as prefetches (they leave the queue); returns how
        many found room."""
        rank = self.current_rank()
        args = (keys, self.table, self.K, self.flags, self.resident, rank.primary, rank.secondary, rank.control)
        m = int(sk.prefetch(*args, _NONE, self.scratch_slots, self.qprio, self.qkeys))
        if m == sk.NEED_VICTIMS:   # the policy's victims (none: only the empty slots)
            empty = self.capacity - int(self.counts[0])
            victims = self._policy_victims(keys.size - empty, True)
            none = self._admit_none
            m = int(sk.prefetch(keys, self.table, self.K, self.flags, self.resident, none.primary, none.secondary,
                                none.control, victims, self.scratch_slots, self.qprio, self.qkeys))
        start_copy = self.transport.start_copy
        for key, slot in zip(keys[:m].tolist(), self.scratch_slots[:m].tolist()):
            start_copy(slot, key)
        self.prefetch_copies += m
        return m

    def prefetch_now(self, keys: np.ndarray) -> int:
        """Start copying the non-resident `keys` (in the given order) at once, outside the prefetch queue
        and its in-flight limit, behind the demand copies already issued (prefill lookahead). Victims come
        from the policy among slots that are neither in use nor unused prefetches. Returns copies issued."""
        missing = keys[~self.resident[keys]].astype(np.int64, copy=False)
        return self._start_prefetches(missing) if missing.size else 0

    def end_iteration(self) -> None:
        sk.clear_queue(self.table, self.qprio, self.qkeys)

    def load_all(self) -> None:
        """Fill the cache with every expert, key k in slot k (resident policy): capacity must equal L*J."""
        if self.capacity != self.K:
            raise RuntimeError(f"expert cache of {self.capacity} slots cannot hold all {self.K} experts one per slot")
        self.slot_of[:] = self.key_of[:] = np.arange(self.K)
        self.resident[:] = True
        self.counts[0] = self.K
        self.flags[:] = 0
        for key in range(self.K):
            self.transport.start_copy(key, key)

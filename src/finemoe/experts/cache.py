"""The device expert cache: N preallocated slots, a residency table, demand loads and prefetches.

Keys are flat (key = layer * J + expert). What occupies which slot, and who is evicted, is decided by
compiled kernels (slot_kernels.py) over the cache's SlotState: one call per layer, no Python per expert,
victims read from the policy's live rank arrays (EvictionRank, asked once at the first placement; the policy's
only eviction decision). This class drives them and hands each placed expert to the transport (experts/transport.py
Transport: CUDA copies, an immediate CPU copy, or the simulator's clock), which copies. Engine and simulator
run this same class, so they agree on hits, misses and bytes by construction.

Prefetches are issued by one of two rules (experts/prefetch_issue.py): `inflight` (whole copies, at most
`prefetch_inflight` in flight) or `idle` (chunks that fit the copy engine's predicted idle time; no victim the
policy values more than the prefetched expert); `off` drops them (demand copies only). Under `idle`, an expert
computed on the host CPU (--miss-compute cpu|auto; `note_cpu`) is queued at the next iteration's start
(`begin_iteration`) as a prefetch below every policy prefetch: copied for reuse into the idle copy time the
policy's prefetches leave, under the same victim rules.

Definitions:
  hit    the expert is resident and its copy had finished when the router asked for it.
  miss   anything else (absent, or still in flight); the layer waits for the copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from finemoe.experts import slot_kernels as sk
from finemoe.experts.prefetch_issue import INFLIGHT, PrefetchIssue
from finemoe.experts.transport import Transport
from finemoe.jit import FixedTypes
from finemoe.policies.base import CacheView, EvictionRank, Policy, Prefetch

_FILLED, _WASTED, _QUEUED = (sk.TALLY.names.index(name) for name in ("filled", "wasted", "queued"))
_KERNELS = ("demand", "claim_partial", "release", "enqueue", "drop_stale", "best_queued", "plan_idle",
            "prefetching_slots", "prefetch", "clear_queue")


@dataclass
class DemandResult:
    slots: np.ndarray     # [n] slot of each requested expert
    hit: np.ndarray       # [n] bool
    loaded: int           # experts copied on demand


class ExpertCache:
    def __init__(self, total_experts: int, num_experts: int, capacity: int, transport: Transport,
                 policy: Policy, prefetch_inflight: int = 4, issue: PrefetchIssue = INFLIGHT) -> None:
        sk.warm_up()
        self.J = num_experts
        self.K = total_experts
        self.capacity = capacity
        self.transport = transport
        self.policy = policy
        self.prefetch_inflight = prefetch_inflight
        self.issue = issue
        self.state = sk.SlotState.empty(total_experts, capacity, issue.idle, issue.chunk_bytes,
                                        transport.expert_bytes if issue.idle else 1,
                                        gated=issue.idle and policy.gate_values_keys, off=issue.off)
        self._tally = memoryview(self.state.tally.view(np.int64))   # the TALLY fields, for fast scalar reads
        self.slot_of = self.state.slot_of                      # [L*J] slot or -1 (read-only outside)
        self.key_of = self.state.key_of                        # [N] key or -1
        self.flags = self.state.flags                          # [N] slot state bits (slot_kernels)
        self.resident = self.state.resident                    # [L*J] live view handed to policies
        self.scratch_slots = np.empty(max(capacity, 1), np.int64)    # kernel outputs, reused (by compiled drivers too)
        self.scratch_keys = np.empty(total_experts, np.int64)
        self.scratch_new = np.empty(max(capacity, 1), bool)
        self.scratch_hit = np.empty(max(capacity, 1), bool)
        # the slot kernels bound to this cache's argument types (its state, C-contiguous int64/float64 arrays,
        # Python ints and floats): no per-call type dispatch
        self.k = SimpleNamespace(**{name: FixedTypes(getattr(sk, name)) for name in _KERNELS})
        self._rank: EvictionRank | None = None   # the policy's eviction rank (asked at the first placement)
        self.prefetch_copies = 0

    @property
    def filled(self) -> int:
        return self._tally[_FILLED]

    @property
    def queued(self) -> int:
        return self._tally[_QUEUED]

    @property
    def wasted_prefetches(self) -> int:
        return self._tally[_WASTED]

    def view(self) -> CacheView:
        return CacheView(self.resident, self.capacity)

    # ---- victims -----------------------------------------------------------------------------
    @property
    def rank(self) -> EvictionRank:
        """The policy's eviction rank, asked once, at the first placement (the policy is bound by then). A policy
        that never evicts has none (the cache holds every expert): slot order stands in."""
        if self._rank is None:
            self._rank = self.policy.eviction_rank() or EvictionRank.of(np.zeros(self.K))
        return self._rank

    # ---- demand path -------------------------------------------------------------------------
    def acquire(self, layer: int, experts: np.ndarray) -> DemandResult:
        """Make `experts` of `layer` (distinct, len <= capacity) resident and pin them until `release`.
        Misses are copied at once, ahead of any prefetch not yet issued. The caller has learned this
        layer's routing with a host sync, so the previous layer's compute has finished: its slots are
        no longer computing (the pinned ones of this layer take that role until `release`)."""
        experts = np.ascontiguousarray(experts, dtype=np.int64)
        n, base = experts.size, layer * self.J
        loaded = int(self.k.demand(self.state, base, experts, self.rank, self.scratch_slots, self.scratch_new))
        if loaded == sk.NO_ROOM:
            raise RuntimeError(f"expert cache of {self.capacity} slots cannot hold {n} experts at once")
        slots = self.scratch_slots[:n].copy()
        claimed = self.issue.idle and self.k.claim_partial(self.state, slots, n)
        if claimed:
            self._copy_runs(1, demand=True)      # the rest of a partly issued prefetch, first in line
        hit = self.transport.load(slots, base + experts, self.scratch_new[:n])
        if claimed:
            hit[slots == self.state.runs.slot[0]] = False    # its copy had not finished when asked: a miss
        return DemandResult(slots, hit, loaded)

    def release(self, slots: np.ndarray) -> None:
        """The layer's compute that reads `slots` has been issued. Until the next release a prefetch does not
        evict them: its copy would wait on the copy stream for that compute, and every copy behind it too."""
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        self.transport.used(slots)
        self.k.release(self.state, slots, slots.size)

    # ---- prefetch path -----------------------------------------------------------------------
    def enqueue(self, prefetch: Prefetch) -> None:
        """Queue `prefetch`: each key at its priority (a key queued again takes the newer priority; -inf
        withdraws it)."""
        if len(prefetch):
            self.k.enqueue(self.state, np.ascontiguousarray(prefetch.keys, dtype=np.int64),
                           np.ascontiguousarray(prefetch.priority, dtype=np.float64))

    def begin_iteration(self, prefetch: Prefetch) -> int:
        """Iteration start: queue the experts computed on the CPU in the last iteration (idle rule; at
        slot_kernels.CPU_COPY_PRIORITY, below every policy prefetch), then the policy's `prefetch`, and issue
        (pump(-1)). Returns prefetches issued."""
        if self.state.issue[0]["cpu_noted"]:
            sk.enqueue_cpu_computed(self.state)
        self.enqueue(prefetch)
        return self.pump(-1)

    def note_cpu(self, layer: int, experts: np.ndarray) -> None:
        """`experts` of `layer` were computed on the host CPU, not copied: under the idle rule their copies are
        queued at the next `begin_iteration` (nothing under inflight, where they would delay demand copies)."""
        if self.issue.idle:
            sk.note_cpu_keys(self.state, layer * self.J + experts.astype(np.int64, copy=False))

    def pump(self, current_layer: int) -> int:
        """Drop stale requests (layer not ahead of `current_layer`, already resident) and issue the
        best ones (highest priority, then lowest key) while fewer than `prefetch_inflight` prefetch copies
        are in flight. Returns copies issued. With nothing queued there is nothing to drop or issue: return
        at once (which prefetch copies have finished is asked when it matters; a finished copy stays finished).
        simulator/decode_loop.py `pump_timed` is this sequence compiled, over the simulator's clock."""
        if self.issue.idle:
            return self._pump_idle(current_layer)
        if not self._tally[_QUEUED]:
            return 0
        self.k.drop_stale(self.state, (current_layer + 1) * self.J)
        budget = self.prefetch_inflight - self._in_flight()
        if budget <= 0 or not self._tally[_QUEUED]:
            return 0
        m = int(self.k.best_queued(self.state, budget, self.scratch_keys))
        return self._start_prefetches(self.scratch_keys[:m].copy())

    def _pump_idle(self, current_layer: int) -> int:
        """The idle rule: drop stale requests, then issue the chunks (of the partly issued prefetch, then of new
        prefetches) that fit the copy engine's predicted idle bytes. Returns prefetches placed."""
        if not self._tally[_QUEUED] and self.state.issue[0]["partial"] < 0:
            return 0
        if self._tally[_QUEUED]:
            self.k.drop_stale(self.state, (current_layer + 1) * self.J)
        self._in_flight()
        n = int(self.k.plan_idle(self.state, float(self.transport.idle_bytes()), self.rank, self.scratch_keys))
        self._copy_runs(n, demand=False)
        placed = int(np.count_nonzero(self.state.runs.lo[:n] == 0))
        self.prefetch_copies += placed
        return placed

    def _copy_runs(self, n: int, demand: bool) -> None:
        runs, copy_run = self.state.runs, self.transport.copy_run
        for i in range(n):
            copy_run(int(runs.slot[i]), int(runs.key[i]), int(runs.lo[i]), int(runs.hi[i]), demand)

    def _in_flight(self) -> int:
        """Prefetch copies still in flight; finished ones lose their mark (a finished copy stays finished)."""
        m = int(self.k.prefetching_slots(self.state, self.scratch_slots))
        if not m:
            return 0
        flying = self.scratch_slots[:m]
        done = self.transport.finished(flying)                       # [m] bool
        self.flags[flying[done]] &= 255 ^ sk.PREFETCHING
        return m - int(done.sum())

    def _start_prefetches(self, keys: np.ndarray) -> int:
        """Copy `keys` (int64, not resident) into slots now, as prefetches (they leave the queue); returns how
        many found room."""
        m = int(self.k.prefetch(self.state, keys, self.rank, self.scratch_slots))
        if m:
            self.transport.copy(self.scratch_slots[:m].copy(), keys[:m])
        self.prefetch_copies += m
        return m

    def prefetch_now(self, keys: np.ndarray) -> int:
        """Start copying the non-resident `keys` (in the given order) at once, outside the prefetch queue
        and its in-flight limit, behind the demand copies already issued (prefill lookahead). Victims come
        from the policy among slots that are neither in use nor unused prefetches. Returns copies issued."""
        missing = keys[~self.resident[keys]].astype(np.int64, copy=False)
        return self._start_prefetches(missing) if missing.size else 0

    def end_iteration(self) -> None:
        """Clear the prefetch queue (a partly issued prefetch goes on at the next boundary)."""
        if self._tally[_QUEUED]:
            self.k.clear_queue(self.state)

    def load_all(self) -> None:
        """Fill the cache with every expert, key k in slot k (resident policy): capacity must equal L*J."""
        if self.capacity != self.K:
            raise RuntimeError(f"expert cache of {self.capacity} slots cannot hold all {self.K} experts one per slot")
        self.slot_of[:] = self.key_of[:] = np.arange(self.K)
        self.resident[:] = True
        self._tally[_FILLED] = self.K
        self.flags[:] = 0
        keys = np.arange(self.K, dtype=np.int64)
        self.transport.copy(keys, keys)

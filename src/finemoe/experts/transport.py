"""Moving experts from host memory into device slots.

A transport owns the device slot pools (one tensor [N, *shape] per expert tensor name, allocated
once) and the copy mechanics. The cache decides *what* goes where; the transport only copies.
`CudaTransport` copies on a dedicated stream with one event per slot; `SyncTransport` (CPU device)
copies at once; both copy one slot at a time (`PerSlotTransport`). The simulator's timed transport
follows the same contract (`Transport`). Under the idle issue rule (experts/prefetch_issue.py) prefetches go as
byte ranges of an expert (`copy_run`): an expert's bytes are its tensors' bytes in pool order, a range copies the
pieces of the tensors it covers.
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod

import numpy as np
import torch

from finemoe.experts.host_store import HostExpertStore
from finemoe.experts.demand_timing import NO_LOAD, demand_period, idle_seconds


class Transport(ABC):
    """What the cache asks of whatever moves experts into slots: CUDA copies, an immediate CPU copy, or the
    simulator's clock (simulator/transport.py). The cache decides what goes where; the transport only copies.

    Contract (slots int64 [n], keys int64 [n]):
      load(slots, keys, new) -> hit [n] bool   one layer's demand: copy keys[new] into slots[new] now, in
          order, ahead of any prefetch not yet issued and after any compute still reading the slot; hit = not
          new and its copy had finished; the compute that follows waits for every other slot's copy.
      copy(slots, keys)       prefetch copies, in order, behind those issued so far.
      finished(slots) -> bool [n]   which copies into `slots` have finished (never blocks).
      used(slots)             the compute just issued reads `slots` (a later copy into them waits for it).
      copy_run(slot, key, lo, hi, demand)   bytes [lo, hi) of expert `key` into `slot`, behind those issued so far
          (after any compute still reading the slot); the slot's copy has finished once the range ending at the
          expert's size has landed (ranges of one slot come in order, from 0). `demand`: a demand needs it.
      idle_bytes() -> float   bytes the copy engine is predicted to move, after its queued work, before the next
          layer's demand copies are issued (the idle issue rule's budget; inf: copies cost no copy-engine time).
      queued_seconds() -> float   the copy engine's work queued now, which a demand copy issued now waits behind
          (seconds; 0 when not known; the auto miss split's copy-half offset, experts/miss_split.py).
      expert_bytes            the bytes of one expert's copy (the unit copy_run's ranges cut).
      compute_slots(slots) -> [n]   after `load`: where the compute reads `slots` in the compute device's pool
          (one device: the slots themselves; several: experts/multi_device.py, peer copies into staging slots).
      compute_pool_size(capacity) -> int   the compute device's pool size (the window the compute may read)."""

    bytes_copied: int = 0
    expert_bytes: int = 1

    @abstractmethod
    def load(self, slots: np.ndarray, keys: np.ndarray, new: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def copy(self, slots: np.ndarray, keys: np.ndarray) -> None: ...

    @abstractmethod
    def finished(self, slots: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def used(self, slots: np.ndarray) -> None: ...

    @abstractmethod
    def copy_run(self, slot: int, key: int, lo: int, hi: int, demand: bool) -> None: ...

    def idle_bytes(self) -> float:
        """Default: copies cost no copy-engine time (they complete when issued)."""
        return math.inf

    def queued_seconds(self) -> float:
        """Default: copies complete when issued, nothing is ever queued."""
        return 0.0

    def drain_stall_seconds(self) -> float:
        """Stall time accumulated since the last drain (may synchronize: call at iteration end)."""
        return 0.0

    def compute_slots(self, slots: np.ndarray) -> np.ndarray:
        """Default (one device): the compute reads the cache's slots themselves."""
        return slots

    def compute_pool_size(self, capacity: int) -> int:
        """Default (one device): the pool is the cache's `capacity` slots."""
        return capacity

    def finish_all(self) -> None:
        """Block until every copy issued so far has landed (start-up only: e.g. after loading every expert)."""


class PerSlotTransport(Transport):
    """A transport that copies one slot at a time (the engine's): `start_copy(slot, key)` begins loading expert
    `key` into `slot` after any compute that still reads the slot; `is_done(slot)` never blocks;
    `wait_compute(slots)` makes the compute that follows wait for those slots' copies (recording stall time);
    `mark_used(slots)` records that the compute just issued reads them."""

    @abstractmethod
    def start_copy(self, slot: int, key: int) -> None: ...

    @abstractmethod
    def is_done(self, slot: int) -> bool: ...

    @abstractmethod
    def wait_compute(self, slots: np.ndarray) -> None: ...

    def mark_used(self, slots: np.ndarray) -> None:
        """Default: nothing to order (synchronous devices)."""

    def start_range(self, slot: int, key: int, lo: int, hi: int) -> None:
        """Begin copying bytes [lo, hi) of expert `key` into `slot`. Default, for a transport that copies whole
        experts only: the whole copy starts with the last range (the slot is usable only then either way)."""
        if hi == self.expert_bytes:
            self.start_copy(slot, key)

    def copy_run(self, slot: int, key: int, lo: int, hi: int, demand: bool) -> None:
        self.start_range(slot, key, lo, hi)

    def load(self, slots: np.ndarray, keys: np.ndarray, new: np.ndarray) -> np.ndarray:
        slot_list, new_list = slots.tolist(), new.tolist()
        is_done = self.is_done
        hit = [not w and is_done(s) for s, w in zip(slot_list, new_list)]
        if any(new_list):
            for s, k, w in zip(slot_list, keys.tolist(), new_list):
                if w:
                    self.start_copy(s, k)
        if not all(hit):
            self.wait_compute(np.array([s for s, h in zip(slot_list, hit) if not h], dtype=np.int64))
        return np.array(hit, dtype=bool)

    def copy(self, slots: np.ndarray, keys: np.ndarray) -> None:
        for s, k in zip(slots.tolist(), keys.tolist()):
            self.start_copy(s, k)

    def finished(self, slots: np.ndarray) -> np.ndarray:
        return np.array([self.is_done(s) for s in slots.tolist()], dtype=bool)

    def used(self, slots: np.ndarray) -> None:
        self.mark_used(slots)


class SlotPools:
    """Preallocated device tensors, one [N, *shape] per expert tensor name, zero-filled: a slot that was never
    loaded holds finite values (a graph batch's finished rows may read any slot; see runtime.DEAD_ROW)."""

    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device) -> None:
        g = store.geometry
        self.num_slots = num_slots
        self.tensors = {name: torch.zeros((num_slots, *shape), dtype=store.dtypes[name], device=device)
                        for name, shape in g.param_shapes.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def pieces(self, lo: int, hi: int) -> list[tuple[str, int, int]]:
        """Bytes [lo, hi) of one expert (its tensors' bytes in pool order) as (name, first, end) element ranges of
        the flattened tensors it covers. lo and hi fall on element boundaries (prefetch_issue.CHUNK_ALIGN)."""
        out, offset = [], 0
        for name, pool in self.tensors.items():
            size = pool[0].numel() * pool.element_size()
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                out.append((name, (a - offset) // pool.element_size(), (b - offset) // pool.element_size()))
            offset += size
        return out


class SyncTransport(PerSlotTransport):
    """Host and 'device' share memory (CPU runs): a copy completes before `start_copy` returns."""

    def __init__(self, store: HostExpertStore, pools: SlotPools) -> None:
        self.store, self.pools = store, pools
        self.num_experts = store.geometry.num_experts
        self.expert_bytes = store.geometry.expert_bytes
        self._stall = 0.0
        self.bytes_copied = 0

    def start_copy(self, slot: int, key: int) -> None:
        layer, expert = divmod(key, self.num_experts)
        t0 = time.perf_counter()
        for name, pool in self.pools.tensors.items():
            pool[slot].copy_(self.store.tensors[layer][name][expert])
        self._stall += time.perf_counter() - t0
        self.bytes_copied += self.expert_bytes

    def start_range(self, slot: int, key: int, lo: int, hi: int) -> None:
        layer, expert = divmod(key, self.num_experts)
        t0 = time.perf_counter()
        for name, a, b in self.pools.pieces(lo, hi):
            self.pools.tensors[name][slot].view(-1)[a:b].copy_(self.store.tensors[layer][name][expert].view(-1)[a:b])
        self._stall += time.perf_counter() - t0
        self.bytes_copied += hi - lo

    def is_done(self, slot: int) -> bool:
        return True

    def wait_compute(self, slots: np.ndarray) -> None:
        pass

    def drain_stall_seconds(self) -> float:
        s, self._stall = self._stall, 0.0
        return s


class CudaTransport(PerSlotTransport):
    """Copies on a dedicated CUDA stream from pinned memory; one completion event per slot.

    Before a slot is overwritten the copy stream waits for the compute event recorded after the
    slot's last use, so eviction never races with a kernel still reading the old expert.
    Stall time is measured on the GPU timeline: events around each wait on the compute stream,
    read back (one sync) by `drain_stall_seconds` at iteration end.

    Ranges (`start_range`, the idle issue rule's chunks) go on the same stream; a slot's completion event is
    recorded after its last range, and the slot counts as not done while a range is missing. `idle_bytes` and
    `queued_seconds` predict the copy engine's idle time and queue on the host, without a sync: the queued work is
    modelled as every copy issued taking bytes / `bandwidth_Bps` (measured at start) after the previous one; the
    next demand is expected one period after the last demand load, on the host clock (experts/demand_timing.py:
    `demand_period`, `idle_seconds`, the rule the simulator runs on its clock).
    """

    def __init__(self, store: HostExpertStore, pools: SlotPools, device: torch.device,
                 bandwidth_Bps: float | None = None) -> None:
        self.store, self.pools, self.device = store, pools, device
        self.num_experts = store.geometry.num_experts
        self.expert_bytes = store.geometry.expert_bytes
        self.stream = torch.cuda.Stream(device=device)
        n = pools.num_slots
        self.copy_done = [torch.cuda.Event() for _ in range(n)]
        self.last_use: list[torch.cuda.Event | None] = [None] * n
        self._known_done = np.ones(n, dtype=bool)
        self._partial = np.zeros(n, dtype=bool)      # a range copy into the slot is missing its last range
        self._stall_pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.bytes_copied = 0
        self.bandwidth_Bps = bandwidth_Bps
        self._busy_until = 0.0                       # host clock (s): predicted end of the copies issued so far
        self._last_load = NO_LOAD                    # host clock (s) of the last demand load
        self._period = 0.0                           # running mean host time between demand loads (s)

    def _queued(self, nbytes: int) -> None:
        if self.bandwidth_Bps:
            self._busy_until = max(time.perf_counter(), self._busy_until) + nbytes / self.bandwidth_Bps
        self.bytes_copied += nbytes

    def start_copy(self, slot: int, key: int) -> None:
        layer, expert = divmod(key, self.num_experts)
        use = self.last_use[slot]
        with torch.cuda.stream(self.stream):
            if use is not None:
                self.stream.wait_event(use)
            for name, pool in self.pools.tensors.items():
                pool[slot].copy_(self.store.tensors[layer][name][expert], non_blocking=True)
            self.copy_done[slot].record(self.stream)
        self._known_done[slot] = False
        self._partial[slot] = False
        self._queued(self.expert_bytes)

    def start_range(self, slot: int, key: int, lo: int, hi: int) -> None:
        """Bytes [lo, hi) of expert `key` into `slot` on the copy stream, from the pinned host tensors (non_blocking:
        the host returns at once); the first range waits for the compute still reading the slot."""
        layer, expert = divmod(key, self.num_experts)
        use = self.last_use[slot]
        with torch.cuda.stream(self.stream):
            if use is not None and lo == 0:
                self.stream.wait_event(use)
            for name, a, b in self.pools.pieces(lo, hi):
                src = self.store.tensors[layer][name][expert].view(-1)
                self.pools.tensors[name][slot].view(-1)[a:b].copy_(src[a:b], non_blocking=True)
            if hi == self.expert_bytes:
                self.copy_done[slot].record(self.stream)
        self._known_done[slot] = False
        self._partial[slot] = hi < self.expert_bytes
        self._queued(hi - lo)

    def load(self, slots: np.ndarray, keys: np.ndarray, new: np.ndarray) -> np.ndarray:
        now = time.perf_counter()
        self._period = demand_period(self._period, self._last_load, now)
        self._last_load = now
        return super().load(slots, keys, new)

    def idle_bytes(self) -> float:
        """Predicted bytes the copy engine moves before the next demand load (0 until a layer period and the
        bandwidth are known). Host clock only: never syncs."""
        if not self.bandwidth_Bps:
            return 0.0
        return idle_seconds(self._last_load, self._period, time.perf_counter(), self._busy_until) * self.bandwidth_Bps

    def queued_seconds(self) -> float:
        """The copies issued so far are predicted to run this much longer (host clock, no sync; 0 without a
        bandwidth)."""
        return max(self._busy_until - time.perf_counter(), 0.0) if self.bandwidth_Bps else 0.0

    def is_done(self, slot: int) -> bool:
        if self._partial[slot]:
            return False
        if not self._known_done[slot] and self.copy_done[slot].query():
            self._known_done[slot] = True
        return bool(self._known_done[slot])

    def wait_compute(self, slots: np.ndarray) -> None:
        pending = [int(s) for s in slots if not self.is_done(int(s))]
        if not pending:
            return
        compute = torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        for s in pending:
            compute.wait_event(self.copy_done[s])
        after.record(compute)
        self._stall_pairs.append((before, after))

    def finish_all(self) -> None:
        self.stream.synchronize()
        self._known_done[:] = True

    def mark_used(self, slots: np.ndarray) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        for s in slots:
            self.last_use[int(s)] = ev

    def drain_stall_seconds(self) -> float:
        if not self._stall_pairs:
            return 0.0
        self._stall_pairs[-1][1].synchronize()
        total = sum(b.elapsed_time(a) for b, a in self._stall_pairs) / 1e3
        self._stall_pairs.clear()
        return total

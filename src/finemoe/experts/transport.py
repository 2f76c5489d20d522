"""Moving experts from host memory into device slots.

A transport owns the device slot pools (one tensor [N, *shape] per expert tensor name, allocated
once) and the copy mechanics. The cache decides *what* goes where; the transport only copies.
`CudaTransport` copies on a dedicated stream with one event per slot; `SyncTransport` (CPU device)
copies at once. The simulator provides a third, timed transport.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np
import torch

from finemoe.experts.host_store import HostExpertStore


class Transport(ABC):
    """Contract: `start_copy(slot, key)` begins loading expert `key` into `slot` after any compute that
    still reads the slot; `is_done(slot)` never blocks; `wait_compute(slots)` makes the compute that
    follows wait for those slots' copies (recording stall time); `mark_used(slots)` records that the
    compute just issued reads them."""

    bytes_copied: int = 0

    @abstractmethod
    def start_copy(self, slot: int, key: int) -> None: ...

    @abstractmethod
    def is_done(self, slot: int) -> bool: ...

    @abstractmethod
    def wait_compute(self, slots: np.ndarray) -> None: ...

    def mark_used(self, slots: np.ndarray) -> None:
        """Default: nothing to order (synchronous devices)."""

    def drain_stall_seconds(self) -> float:
        """Stall time accumulated since the last drain (may synchronize: call at iteration end)."""
        return 0.0

    def finish_all(self) -> None:
        """Block until every copy issued so far has landed (start-up only: e.g. after loading every expert)."""


class SlotPools:
    """Preallocated device tensors, one [N, *shape] per expert tensor name, zero-filled: a slot that was never
    loaded holds finite values (a graph batch's finished rows may read any slot; see runtime.DEAD_ROW)."""

    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device) -> None:
        g = store.geometry
        self.num_slots = num_slots
        self.tensors = {name: torch.zeros((num_slots, *shape), dtype=store.tensors[0][name].dtype, device=device)
                        for name, shape in g.param_shapes.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class SyncTransport(Transport):
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

    def is_done(self, slot: int) -> bool:
        return True

    def wait_compute(self, slots: np.ndarray) -> None:
        pass

    def drain_stall_seconds(self) -> float:
        s, self._stall = self._stall, 0.0
        return s


class CudaTransport(Transport):
    """Copies on a dedicated CUDA stream from pinned memory; one completion event per slot.

    Before a slot is overwritten the copy stream waits for the compute event recorded after the
    slot's last use, so eviction never races with a kernel still reading the old expert.
    Stall time is measured on the GPU timeline: events around each wait on the compute stream,
    read back (one sync) by `drain_stall_seconds` at iteration end.
    """

    def __init__(self, store: HostExpertStore, pools: SlotPools, device: torch.device) -> None:
        self.store, self.pools, self.device = store, pools, device
        self.num_experts = store.geometry.num_experts
        self.expert_bytes = store.geometry.expert_bytes
        self.stream = torch.cuda.Stream(device=device)
        n = pools.num_slots
        self.copy_done = [torch.cuda.Event() for _ in range(n)]
        self.last_use: list[torch.cuda.Event | None] = [None] * n
        self._known_done = np.ones(n, dtype=bool)
        self._stall_pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.bytes_copied = 0

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
        self.bytes_copied += self.expert_bytes

    def is_done(self, slot: int) -> bool:
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

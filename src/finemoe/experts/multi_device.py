"""One expert cache over several devices (`--devices cuda:0,cuda:1`): the Transport of experts/transport.py over
one per-device transport each, with peer copies between them.

The cache and the policies see N slots (one residency table, one eviction order); `Placement` (placement.py)
puts slot s on device d(s), at index s - first_slot[d] of that device's pool. A host copy into slot s is device
d(s)'s transport's copy (pinned host memory -> d(s)). MoE layer l computes on device c = moe_device[l] (the first
device under `primary`, its own range's device under `split`): the layer whose demand `load` received last (its
keys // J) is the computing one, and `wait_compute`, `compute_slots` and `mark_used` act on its device.
`compute_slots(slots)`, called after a layer's demand, gives the slots the compute reads in c's pool: a slot on c
reads itself; a slot on another device b is peer-copied b -> c into one of c's staging slots (the pool's last
`staging[c]` rows), after its own host copy has landed and after the compute that last read that staging slot; the
compute waits for those peer copies. An expert resident on b is thus never read from host memory again while it
stays resident: each use on another device costs a peer copy instead.

`PeerCopies` moves one slot's expert between two devices' pools: `SyncPeerCopies` at once (CPU pools),
`CudaPeerCopies` on a stream of the destination device, ordered by events.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from finemoe.experts.host_store import HostExpertStore
from finemoe.experts.placement import Placement
from finemoe.experts.transport import CudaTransport, PerSlotTransport, SlotPools, SyncTransport


class PeerCopies(ABC):
    """Copies of whole experts between devices' slot pools (dst is always the computing layer's device's pool)."""

    @abstractmethod
    def copy(self, src_dev: int, src: int, dst_dev: int, dst: int) -> None:
        """Pool `src_dev`'s slot `src` into pool `dst_dev`'s slot `dst`, after src's copy landed and after the
        compute that last read dst; a later host copy into src waits for this copy."""

    def wait(self, dst_dev: int, dst: np.ndarray) -> None:
        """The compute that follows on `dst_dev` waits for the peer copies into `dst`. Default: they are done."""

    def used(self, dst_dev: int, dst: np.ndarray) -> None:
        """The compute just issued on `dst_dev` reads `dst`. Default: nothing to order."""


class SyncPeerCopies(PeerCopies):
    """Pools that share memory with the host (CPU): a copy is done when `copy` returns."""

    def __init__(self, pools: list[SlotPools]) -> None:
        self.pools = pools

    def copy(self, src_dev: int, src: int, dst_dev: int, dst: int) -> None:
        for name, pool in self.pools[dst_dev].tensors.items():
            pool[dst].copy_(self.pools[src_dev].tensors[name][src])


class CudaPeerCopies(PeerCopies):
    """Peer copies on one stream of each destination GPU; one completion event and one last-use event per
    staging slot. The source slot's host copy event is waited for on this stream (an event of another GPU), and
    the source's `last_use` becomes this copy's event, so the source's next host copy waits for it."""

    def __init__(self, pools: list[SlotPools], parts: list[CudaTransport]) -> None:
        self.pools, self.parts = pools, parts
        self.streams = [torch.cuda.Stream(device=p.device) for p in parts]
        self.done = [[torch.cuda.Event() for _ in range(p.num_slots)] for p in pools]
        self.last_use: list[list[torch.cuda.Event | None]] = [[None] * p.num_slots for p in pools]

    def copy(self, src_dev: int, src: int, dst_dev: int, dst: int) -> None:
        stream, event = self.streams[dst_dev], self.done[dst_dev][dst]
        with torch.cuda.stream(stream):
            if not self.parts[src_dev].is_done(src):
                stream.wait_event(self.parts[src_dev].copy_done[src])
            if self.last_use[dst_dev][dst] is not None:
                stream.wait_event(self.last_use[dst_dev][dst])
            for name, pool in self.pools[dst_dev].tensors.items():
                pool[dst].copy_(self.pools[src_dev].tensors[name][src], non_blocking=True)
            event.record(stream)
        self.parts[src_dev].last_use[src] = event

    def wait(self, dst_dev: int, dst: np.ndarray) -> None:
        compute = torch.cuda.current_stream(self.parts[dst_dev].device)
        for s in dst.tolist():
            compute.wait_event(self.done[dst_dev][s])

    def used(self, dst_dev: int, dst: np.ndarray) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.parts[dst_dev].device))
        for s in dst.tolist():
            self.last_use[dst_dev][s] = ev


class MultiDeviceTransport(PerSlotTransport):
    """The cache's transport over several devices (see the module docstring). `host_copies` and `peer_copies`
    count whole-expert copies (a host copy's ranges count once, at the first); `peer_bytes_copied` the peer
    bytes (`bytes_copied` stays the host bytes, as on one device)."""

    def __init__(self, placement: Placement, parts: list[PerSlotTransport], peer: PeerCopies, expert_bytes: int,
                 num_experts: int) -> None:
        self.placement, self.parts, self.peer = placement, parts, peer
        self.expert_bytes, self.num_experts = expert_bytes, num_experts
        self.compute = int(placement.moe_device[0])  # the device of the layer whose demand was loaded last
        self.host_copies = self.peer_copies = self.peer_bytes_copied = 0
        self._own = [placement.slots_on(d) for d in range(len(parts))]   # staging slots start here in each pool
        self._staged = np.zeros(0, np.int64)         # staging slots the compute being prepared reads

    @property
    def bytes_copied(self) -> int:
        return sum(p.bytes_copied for p in self.parts)

    def _locate(self, slot: int) -> tuple[int, int]:
        d = int(self.placement.slot_device[slot])
        return d, slot - int(self.placement.first_slot[d])

    def start_copy(self, slot: int, key: int) -> None:
        d, i = self._locate(slot)
        self.parts[d].start_copy(i, key)
        self.host_copies += 1

    def start_range(self, slot: int, key: int, lo: int, hi: int) -> None:
        d, i = self._locate(slot)
        self.parts[d].start_range(i, key, lo, hi)
        self.host_copies += lo == 0

    def is_done(self, slot: int) -> bool:
        d, i = self._locate(slot)
        return self.parts[d].is_done(i)

    def load(self, slots: np.ndarray, keys: np.ndarray, new: np.ndarray) -> np.ndarray:
        """One layer's demand (see Transport.load); its layer (keys // J) becomes the computing one."""
        if keys.size:
            self.compute = int(self.placement.moe_device[int(keys[0]) // self.num_experts])
        return super().load(slots, keys, new)

    def wait_compute(self, slots: np.ndarray) -> None:
        """Only the compute device's own slots: the others are read through peer copies that wait for them."""
        dev, idx = self.placement.local(slots)
        own = idx[dev == self.compute]
        if own.size:
            self.parts[self.compute].wait_compute(own)

    def compute_pool_size(self, capacity: int) -> int:
        return self._own[self.compute] + int(self.placement.staging[self.compute])

    def compute_slots(self, slots: np.ndarray) -> np.ndarray:
        dev, out = self.placement.local(slots)
        away = np.flatnonzero(dev != self.compute)
        if away.size > self.placement.staging[self.compute]:
            raise RuntimeError(f"{away.size} experts of one layer live on other devices, more than the "
                               f"{int(self.placement.staging[self.compute])} staging slots")
        staged = self._own[self.compute] + np.arange(away.size, dtype=np.int64)
        for a, t in zip(away.tolist(), staged.tolist()):
            self.peer.copy(int(dev[a]), int(out[a]), self.compute, t)
        if away.size:
            self.peer.wait(self.compute, staged)
            out[away] = staged
        self.peer_copies += away.size
        self.peer_bytes_copied += away.size * self.expert_bytes
        self._staged = staged
        return out

    def mark_used(self, slots: np.ndarray) -> None:
        dev, idx = self.placement.local(slots)
        own = idx[dev == self.compute]
        if own.size:
            self.parts[self.compute].mark_used(own)
        if self._staged.size:
            self.peer.used(self.compute, self._staged)
            self._staged = np.zeros(0, np.int64)

    def queued_seconds(self) -> float:
        return max(p.queued_seconds() for p in self.parts)

    def drain_stall_seconds(self) -> float:
        return sum(p.drain_stall_seconds() for p in self.parts)

    def finish_all(self) -> None:
        for p in self.parts:
            p.finish_all()


def build(store: HostExpertStore, placement: Placement, bandwidth_Bps: float | None = None
          ) -> tuple[list[SlotPools], MultiDeviceTransport]:
    """Each device's pool (its slots, then its staging slots) and the transport over them: CUDA copies and peer
    copies on GPUs, immediate copies on CPU pools (placement.devices may repeat 'cpu': several pools on one CPU)."""
    devices = [torch.device(d) for d in placement.devices]
    pools = [SlotPools(store, placement.slots_on(d) + int(placement.staging[d]), dev) for d, dev in enumerate(devices)]
    if devices[0].type == "cuda":
        parts = [CudaTransport(store, p, dev, bandwidth_Bps) for p, dev in zip(pools, devices)]
        peer: PeerCopies = CudaPeerCopies(pools, parts)
    else:
        parts, peer = [SyncTransport(store, p) for p in pools], SyncPeerCopies(pools)
    return pools, MultiDeviceTransport(placement, parts, peer, store.geometry.expert_bytes,
                                       store.geometry.num_experts)

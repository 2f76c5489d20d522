"""Transports for `--expert-transfer packed`: an expert's packed bytes (experts/packed_store.py) are copied and
unpacked into its slot, bit for bit the plain weights (experts/codec.py).

`PackedCudaTransport`: the copy stream copies an expert's packed buffer (in ranges under the idle issue rule) and,
with its last range, its escapes into a staging buffer (one of a ring of `STAGING`); an unpack stream waits for that
copy and for the compute still reading the slot, unpacks every tensor into the slot (codec.unpack_into, compiled by
torch.compile: one fused kernel per tensor, compiled at start under inference mode, as serving calls it) and writes
the escapes, then records the slot's completion event (what the compute waits for) and the staging buffer's release
(what the copy stream waits for before reusing it). Demand and prefetch copies keep the order the cache issues them
in; a copy moves 3/4 of the plain bytes, and the unpack of one expert overlaps the next one's copy.
`PackedSyncTransport` (CPU device): unpacked at once, eagerly. Several devices and CPU-computed misses need the
plain host tensors: config.py refuses them with packed."""
from __future__ import annotations

import time
from collections import deque

import torch

from finemoe.experts import codec
from finemoe.experts.packed_store import PackedStore
from finemoe.experts.transport import CudaTransport, SlotPools, SyncTransport

STAGING = 4          # staging buffers on the device: one may hold a partly copied prefetch, the rest turn over

def compiled_unpack():
    """codec.unpack_into under torch.compile (one fused kernel per tensor shape, compiled at its first call). The
    engine builds it once and hands it to every PackedCudaTransport, so a reconfigure compiles nothing again."""
    return torch.compile(codec.unpack_into, fullgraph=True, dynamic=False)


def unpack_expert(store: PackedStore, layer: int, expert: int, views: list[tuple[torch.Tensor, torch.Tensor]],
                  pos: torch.Tensor, val: torch.Tensor, outs: list[torch.Tensor], unpack) -> None:
    """Expert `expert` of `layer`, packed as `views` (store.part_views of its buffer) with its escapes pos / val,
    all on the device of outs (its tensors' slot views, in part order) -> outs. `unpack`: codec.unpack_into or its
    compiled form."""
    start = 0
    for (data, base), out, n in zip(views, outs, store.esc_counts[layer, expert].tolist()):
        unpack(data, base, out)
        if n:
            codec.write_escapes(pos[start:start + n], val[start:start + n], out)
            start += n


class PackedSyncTransport(SyncTransport):
    """CPU device: an expert is unpacked into its slot when its last range (or whole copy) is issued."""

    def __init__(self, store: PackedStore, pools: SlotPools) -> None:
        super().__init__(store, pools)
        self.expert_bytes = store.copy_bytes

    def start_copy(self, slot: int, key: int) -> None:
        self.start_range(slot, key, 0, self.expert_bytes)

    def start_range(self, slot: int, key: int, lo: int, hi: int) -> None:
        t0 = time.perf_counter()
        self.bytes_copied += hi - lo
        if hi == self.expert_bytes:
            layer, expert = divmod(key, self.num_experts)
            data, pos, val = self.store.expert_sources(layer, expert)
            outs = [self.pools.tensors[p.name][slot] for p in self.store.parts]
            unpack_expert(self.store, layer, expert, self.store.part_views(data), pos, val, outs, codec.unpack_into)
            self.bytes_copied += pos.numel() * 8 + val.numel() * 2
        self._stall += time.perf_counter() - t0


class Staging:
    """STAGING device buffers for packed experts: each a packed buffer and room for the most escapes of any expert,
    with an event per buffer recorded after its last unpack. `take` hands out the buffer released longest ago."""

    def __init__(self, store: PackedStore, device: torch.device, count: int = STAGING) -> None:
        E = max(store.max_escapes, 1)
        self.data = [torch.empty(store.copy_bytes, dtype=torch.uint8, device=device) for _ in range(count)]
        self.pos = [torch.empty(E, dtype=torch.int64, device=device) for _ in range(count)]
        self.val = [torch.empty(E, dtype=torch.int16, device=device) for _ in range(count)]
        self.copied = [torch.cuda.Event() for _ in range(count)]     # recorded after a buffer's last copy
        self.released = [torch.cuda.Event() for _ in range(count)]   # recorded after its unpack
        self.unpacked_once = [False] * count
        self.free = deque(range(count))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for group in (self.data, self.pos, self.val) for t in group)

    def take(self, copy_stream: torch.cuda.Stream) -> int:
        """A free buffer; the copy stream waits for its last unpack before anything copies into it."""
        b = self.free.popleft()
        if self.unpacked_once[b]:
            copy_stream.wait_event(self.released[b])
        return b

    def give(self, b: int, unpack_stream: torch.cuda.Stream) -> None:
        """Buffer `b`'s unpack has been issued on `unpack_stream`: free once it has run."""
        self.released[b].record(unpack_stream)
        self.unpacked_once[b] = True
        self.free.append(b)


class PackedCudaTransport(CudaTransport):
    """CudaTransport over a PackedStore (module docstring): copies of packed bytes into staging buffers, unpacks on
    a stream of their own into the slots."""

    def __init__(self, store: PackedStore, pools: SlotPools, device: torch.device, unpack,
                 bandwidth_Bps: float | None = None) -> None:
        """unpack: `compiled_unpack()`, built once by the caller."""
        super().__init__(store, pools, device, bandwidth_Bps)
        self.expert_bytes = store.copy_bytes
        self.unpack_stream = torch.cuda.Stream(device=device)
        self.staging = Staging(store, device)
        self._views = [store.part_views(d) for d in self.staging.data]           # per staging buffer
        self._outs = [[pools.tensors[p.name][s] for p in store.parts] for s in range(pools.num_slots)]   # per slot
        self._staged: dict[int, int] = {}          # slot -> staging buffer of its partly copied expert
        self.unpack = unpack
        self._warm_up()

    @torch.inference_mode()   # as serving calls it: the compiled unpack's guards include the grad mode
    def _warm_up(self) -> None:
        """Compile the unpack for every tensor shape now (layer 0, expert 0 into slot 0), not in a request."""
        data, pos, val = self.store.expert_sources(0, 0)
        b = self.staging.free[0]
        self.staging.data[b].copy_(data)
        unpack_expert(self.store, 0, 0, self._views[b], pos.to(self.device), val.to(self.device), self._outs[0],
                      self.unpack)
        torch.cuda.synchronize(self.device)

    def start_copy(self, slot: int, key: int) -> None:
        self.start_range(slot, key, 0, self.expert_bytes)

    def start_range(self, slot: int, key: int, lo: int, hi: int) -> None:
        """Bytes [lo, hi) of expert `key`'s packed buffer into its staging buffer (the first range takes one); with
        the last range its escapes too, and the unpack into `slot` is queued behind them."""
        layer, expert = divmod(key, self.num_experts)
        st = self.staging
        data, pos, val = self.store.expert_sources(layer, expert)
        moved = hi - lo
        if lo == 0 and slot in self._staged:     # an earlier partial copy into this slot was given up: its buffer
            st.free.append(self._staged.pop(slot))   # is free (later copies into it follow on the same stream)
        with torch.cuda.stream(self.stream):
            b = self._staged.pop(slot) if lo > 0 else st.take(self.stream)
            st.data[b][lo:hi].copy_(data[lo:hi], non_blocking=True)
            last = hi == self.expert_bytes
            if last:
                E = pos.numel()
                if E:
                    st.pos[b][:E].copy_(pos, non_blocking=True)
                    st.val[b][:E].copy_(val, non_blocking=True)
                    moved += E * 10
                st.copied[b].record(self.stream)
        if not last:
            self._staged[slot] = b
        else:
            use = self.last_use[slot]
            with torch.cuda.stream(self.unpack_stream), torch.inference_mode():
                self.unpack_stream.wait_event(st.copied[b])
                if use is not None:
                    self.unpack_stream.wait_event(use)
                unpack_expert(self.store, layer, expert, self._views[b], st.pos[b], st.val[b], self._outs[slot],
                              self.unpack)
                self.copy_done[slot].record(self.unpack_stream)
            st.give(b, self.unpack_stream)
        self._known_done[slot] = False
        self._partial[slot] = not last
        self._queued(moved)

    def finish_all(self) -> None:
        self.stream.synchronize()
        self.unpack_stream.synchronize()
        self._known_done[:] = True

"""One expert cache over several devices (experts/multi_device.py): host copies land on the slot's device, a
layer computes on the first device and reads experts resident elsewhere through peer copies, never from host
memory again; the cache and the policy see one cache of every device's slots."""
from __future__ import annotations

import numpy as np
import pytest

from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.experts.multi_device import MultiDeviceTransport, PeerCopies
from finemoe.experts.placement import place
from finemoe.experts.transport import PerSlotTransport
from test_cache_lru import ManualTransport, make_cache

J = 4


class RecordingPeer(PeerCopies):
    def __init__(self) -> None:
        self.copies: list[tuple[int, int, int, int]] = []   # (src device, src index, dst device, dst index)
        self.waits: list[list[int]] = []
        self.used_slots: list[list[int]] = []

    def copy(self, src_dev: int, src: int, dst_dev: int, dst: int) -> None:
        self.copies.append((src_dev, src, dst_dev, dst))

    def wait(self, dst_dev: int, dst: np.ndarray) -> None:
        self.waits.append(dst.tolist())

    def used(self, dst_dev: int, dst: np.ndarray) -> None:
        self.used_slots.append(dst.tolist())


def two_devices(slots_each: int = 2) -> tuple[MultiDeviceTransport, list[PerSlotTransport], RecordingPeer]:
    placement = place(("cuda:0", "cuda:1"), slots_each, total_experts=3 * J, num_experts=J,
                      layer_device=np.zeros(3, np.int64), moe_layers=np.arange(3), mode="primary")
    parts, peer = [ManualTransport(), ManualTransport()], RecordingPeer()
    return MultiDeviceTransport(placement, parts, peer, expert_bytes=100, num_experts=J), parts, peer


def test_misses_are_host_copies_onto_the_slots_device_and_remote_experts_reach_the_compute_device_by_peer():
    transport, parts, peer = two_devices()
    cache, _, _ = make_cache(4, transport=transport)
    assert cache.capacity == 4 and cache.view().capacity == 4          # the policy sees one cache of 2 + 2 slots
    res = cache.acquire(0, np.arange(J))                                # layer 0, experts 0..3: all miss
    assert res.slots.tolist() == [0, 1, 2, 3]
    assert parts[0].copies == [(0, 0), (1, 1)] and parts[1].copies == [(0, 2), (1, 3)]   # (index on device, key)
    assert transport.host_copies == 4 and transport.bytes_copied == 400
    assert parts[0].waits == [[0, 1]] and parts[1].waits == []          # the compute waits on its own copies only
    local = transport.compute_slots(res.slots)
    assert local.tolist() == [0, 1, 2, 3]                               # device 1's experts in staging rows 2, 3
    assert peer.copies == [(1, 0, 0, 2), (1, 1, 0, 3)] and peer.waits == [[2, 3]]
    cache.release(res.slots)
    assert peer.used_slots == [[2, 3]]
    for p in parts:
        p.finish()
    again = cache.acquire(0, np.array([1, 2]))                          # both resident: hits, no host copy
    assert again.hit.tolist() == [True, True] and transport.host_copies == 4
    assert transport.compute_slots(again.slots).tolist() == [1, 2]      # expert 2 (device 1) staged once more
    assert peer.copies[-1] == (1, 0, 0, 2) and transport.peer_copies == 3
    assert transport.peer_bytes_copied == 300


def test_eviction_sees_every_devices_slots_as_one_cache():
    transport, parts, _ = two_devices()
    cache, _, _ = make_cache(4, transport=transport)
    cache.release(cache.acquire(0, np.arange(J)).slots)
    for p in parts:
        p.finish()
    res = cache.acquire(1, np.array([0]))             # LRU evicts the least recent of all four: layer 0's expert 0
    assert res.slots.tolist() == [0] and parts[0].copies[-1] == (0, J)


def engine(budget):
    return Engine.from_config(EngineConfig(policy="lru", expert_budget=budget, device="cpu", show_progress=False))


PROMPTS = ["Hello world", "The quick brown fox jumps", "MoE"]


@pytest.mark.parametrize("batch", [1, 3])
def test_the_engine_over_two_pools_generates_the_same_tokens_as_one_device(batch):
    reference = engine("100%")
    expected = [r.output_ids for p in PROMPTS for r in reference.generate([p], SamplingParams(max_new_tokens=6))]
    eng = engine("5%")
    g = eng.geometry
    per_device = 24          # 5% of 8 layers x 60 experts
    placement = eng.placement("primary", ("cpu", "cpu"), per_device)
    eng.reconfigure("lru", "5%", placement=placement)
    assert eng.cache.capacity == 48 and [p.num_slots for p in eng.device_pools] == [24 + 24, 24]
    got = []
    for start in range(0, len(PROMPTS), batch):
        got += [r.output_ids for r in eng.generate(PROMPTS[start:start + batch], SamplingParams(max_new_tokens=6))]
    assert got == expected
    s = eng.summary([])
    assert s["peer_copies"] > 0 and s["host_copies"] > 0 and s["devices"] == ["cpu", "cpu"]
    t = eng.cache.transport
    assert t.bytes_copied == t.host_copies * g.expert_bytes

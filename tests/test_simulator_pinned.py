"""The simulator's numbers on FLAME routing are pinned to what the original code gave (before eviction ranks,
compiled placement and the other speed-ups)."""
from __future__ import annotations

import pytest

from conftest import require_shared
from finemoe.simulator import CostModel, Replay
from finemoe.traces import load_trace

# What the simulator gave before eviction ranks, compiled placement and the other speed-ups (same trace, budget
# and cost model):
# FLAME #seq (4 x 512 tokens, 8 layers, 64 experts, top-6), 25% = 128 slots, 25 GB/s, 0.3 ms per layer.
# The prefetching policies (oracle, moe-infinity) were re-pinned after two deliberate changes: a copy into a
# slot waits for the compute that last read it (as on the GPU), and a prefetch never evicts the experts of
# the layer computing now (ExpertCache.release).
BEFORE = {
    "lru": (21555, 76749, 1327873130496, 0.027660195839960267, 0.028304177456571357),
    "lfu": (28370, 69934, 1209963380736, 0.025584015359995327, 0.026069540932103355),
    "deepspeed": (18670, 79634, 1377787969536, 0.029736376319990043, 0.029355810948217806),
    "oracle": (56616, 41688, 723099058176, 0.018293564159985287, 0.014470506412812605),
    "moe-infinity": (28400, 69904, 1394449317888, 0.02967843647997892, 0.027636149380468985),
}


# lru's rule then was the classic one, now `order=recency`; its default order (cycle) is pinned as it was introduced.
OPTIONS = {"lru": {"order": "recency"}}
CYCLE_LRU = (25506, 72798, 1259514888192, 0.026276075519962916, 0.026952560940566073)


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_flame_results_are_pinned(name):
    trace = load_trace(str(require_shared("data", "traces", "flame_moe_290m.npz")) + "#seq")
    row = Replay(trace, name, "25%", CostModel(17301504, 25e9, 0.3e-3), OPTIONS.get(name)).run()
    assert (row["hits"], row["misses"], row["bytes_copied"], row["ttft_s"], row["tpot_s"]) == BEFORE[name]


def test_lru_in_cycles_is_pinned_and_beats_the_classic_rule():
    trace = load_trace(str(require_shared("data", "traces", "flame_moe_290m.npz")) + "#seq")
    row = Replay(trace, "lru", "25%", CostModel(17301504, 25e9, 0.3e-3)).run()
    assert (row["hits"], row["misses"], row["bytes_copied"], row["ttft_s"], row["tpot_s"]) == CYCLE_LRU
    assert CYCLE_LRU[0] > BEFORE["lru"][0] and CYCLE_LRU[4] < BEFORE["lru"][4]

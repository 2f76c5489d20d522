"""The compiled slot bookkeeping (experts/slot_kernels.py): eviction order, prefetch queue, and the same results
when numba is switched off and the kernels run as plain Python."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from finemoe.experts import slot_kernels as sk

K, N = 8, 4


def state(keys_in_slots: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cache of N slots holding `keys_in_slots` (slot i holds keys_in_slots[i]) -> table, flags, resident."""
    table = np.full(K + N + 3, -1, np.int64)
    table[K + N:] = 0
    resident = np.zeros(K, bool)
    for slot, key in enumerate(keys_in_slots):
        table[K + slot], table[key] = key, slot
        resident[key] = True
    table[K + N] = len(keys_in_slots)
    return table, np.zeros(N, np.uint8), resident


def test_victims_come_in_primary_then_secondary_then_slot_order_skipping_blocked_slots():
    table, flags, _ = state([5, 1, 7, 2])
    primary = np.array([0, 3, 1, 0, 0, 3, 0, 2], float)     # keys 1 and 5 tie on primary
    secondary = np.array([0, 1, 0, 0, 0, 1, 0, 0], float)   # ... and on secondary: slot order decides (5 first)
    out = np.zeros(N, np.int64)
    assert sk.rank_victims(4, sk.DEMAND_BLOCKED, np.inf, table, K, flags, primary, secondary, out, 0) == 4
    assert out.tolist() == [3, 2, 0, 1]                     # keys 2 (1.0), 7 (2.0), 5 and 1 (3.0, 1.0)
    flags[3] = sk.PINNED
    assert sk.rank_victims(2, sk.DEMAND_BLOCKED, np.inf, table, K, flags, primary, secondary, out, 0) == 2
    assert out[:2].tolist() == [2, 0]
    assert sk.rank_victims(4, sk.DEMAND_BLOCKED, 2.5, table, K, flags, primary, secondary, out, 0) == 1   # limit


def test_demand_fills_empty_slots_then_evicts_and_counts_an_unused_prefetch_as_wasted():
    table, flags, resident = state([0, 1, 2])
    flags[1] = sk.UNUSED                                     # key 1 was prefetched and never used
    primary = np.array([2, 1, 3, 0, 0, 0, 0, 0], float)     # key 1 is the best victim
    slots, new = np.zeros(N, np.int64), np.zeros(N, bool)
    control, none = np.array([np.inf, 1.0]), np.empty(0, np.int64)
    placed = sk.demand(0, np.array([0, 4, 5]), sk.MODE_PIN, table, K, flags, resident, primary, np.zeros(K),
                       control, none, slots, new)
    assert placed == 2 and slots[:3].tolist() == [0, 3, 1] and new[:3].tolist() == [False, True, True]
    assert resident.tolist() == [True, False, True, False, True, True, False, False]
    assert table[K + N + 1] == 1                            # one wasted prefetch
    assert (flags[[0, 3, 1]] & sk.PINNED).all()
    control[1] = 0.0                                         # no valid rank: the cache must ask the policy
    assert sk.demand(0, np.array([6]), sk.MODE_PIN, table, K, flags, resident, primary, np.zeros(K), control,
                     none, slots, new) == sk.NEED_VICTIMS
    assert not resident[6]


def test_the_queue_keeps_the_newest_priority_drops_stale_keys_and_issues_the_best_first():
    table, _, _ = state([3])
    qprio, qkeys, out = np.full(K, np.nan), np.zeros(K, np.int64), np.zeros(K, np.int64)
    sk.enqueue(np.array([2, 3, 5, 6, 7]), np.array([1.0, 9.0, 2.0, 2.0, 0.5]), table, qprio, qkeys)
    sk.enqueue(np.array([7, 6]), np.array([4.0, -np.inf]), table, qprio, qkeys)       # 7 raised, 6 withdrawn
    assert sk.drop_stale(4, table, qprio, qkeys) == 2        # 2 is below key 4, 3 is resident: dropped
    assert sk.best_queued(5, table, qprio, qkeys, out) == 2 and out[:2].tolist() == [7, 5]
    sk.clear_queue(table, qprio, qkeys)
    assert table[-1] == 0 and np.isnan(qprio).all()


SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_sim_speed_orders import skewed_trace_with_probs
from finemoe.simulator import CostModel, Replay
trace, rows = skewed_trace_with_probs(), {{}}
for name in ("lru", "deepspeed", "oracle", "moe-infinity", "finemoe"):
    torch.manual_seed(0)
    opts = {{"fresh": True, "embed": torch.nn.Embedding(50, 8)}} if name == "finemoe" else {{}}
    row = Replay(trace, name, "100B", CostModel(10, 40.0, 0.05), opts, 2).run()
    rows[name] = [row[k] for k in ("hits", "misses", "bytes_copied", "prefetch_copies", "wasted_prefetches", "tpot_s")]
print(json.dumps(rows))
"""


def run_script(disable_jit: bool) -> dict:
    env = dict(os.environ, NUMBA_DISABLE_JIT="1" if disable_jit else "0")
    code = SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_kernels_give_the_same_results_interpreted_as_compiled():
    """NUMBA_DISABLE_JIT=1 runs the kernels' Python source as is (as where numba is missing): same numbers."""
    compiled, interpreted = run_script(False), run_script(True)
    assert compiled == interpreted
    assert all(row[0] > 0 and row[1] > 0 for row in compiled.values())

"""How one MoE layer's routing is counted per batch row: each distinct expert a row's tokens chose counts once, as
a hit if the device served it resident, else as a miss (and as a CPU expert too if the host computed it); tokens of
no row (a finished row kept in a fixed-size batch) count nothing."""
from __future__ import annotations

import numpy as np

from finemoe.engine.stats import count_layer_rows, distinct_experts


def test_distinct_experts_are_np_unique_with_counts():
    topk = np.array([[4, 1], [1, 7], [4, 4]], np.int64)
    experts, counts = distinct_experts(topk, 8)
    want = np.unique(topk, return_counts=True)
    assert experts.tolist() == want[0].tolist() == [1, 4, 7] and counts.tolist() == want[1].tolist() == [2, 3, 1]


def test_rows_count_each_distinct_expert_once():
    token_rows = np.array([0, 0, 1, -2], np.int64)                 # row 0 has two tokens; the last is dead
    topk = np.array([[1, 2], [2, 3], [3, 5], [6, 7]], np.int64)
    experts, hit = np.array([1, 2, 3]), np.array([True, False, True])   # device: 1 and 3 resident, 2 copied
    cpu = np.array([5], np.int64)                                  # 5 computed on the host
    hits, misses, on_cpu = (np.zeros(2, np.int64) for _ in range(3))
    count_layer_rows(token_rows, topk, experts, hit, cpu, 8, hits, misses, on_cpu)
    assert hits.tolist() == [2, 1]          # row 0: 1 and 3; row 1: 3
    assert misses.tolist() == [1, 1]        # row 0: 2 (once, though two tokens chose it); row 1: 5
    assert on_cpu.tolist() == [0, 1]

"""`--miss-compute`: which of a layer's demand misses run on the CPU, under a given cost model. Both halves run
at once, so the layer's misses finish with the slower half; `auto` minimises that."""
from __future__ import annotations

import numpy as np
import pytest

from finemoe.errors import ConfigError
from finemoe.experts.miss_split import AUTO, CPU, GPU, MissCosts, mode_code, split, split_misses


def tokens(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def test_gpu_mode_copies_every_miss_and_cpu_mode_computes_every_miss_on_the_cpu():
    costs = MissCosts(copy_s=1.0, cpu_s=0.1)
    assert not split(tokens(1, 1, 1), GPU, costs).any()
    assert split(tokens(1, 9, 1), CPU, costs).all()


def test_equal_costs_split_the_misses_in_half():
    # 8 one-token misses at 1 s either way: 4 copies and 4 CPU experts finish together after 4 s
    on_cpu = split(tokens(*[1] * 8), AUTO, MissCosts(copy_s=1.0, cpu_s=1.0))
    assert on_cpu.sum() == 4


def test_a_slow_cpu_takes_fewer_misses_and_a_fast_cpu_more():
    t = tokens(*[1] * 12)
    slow = split(t, AUTO, MissCosts(copy_s=1.0, cpu_s=3.0)).sum()      # max(3m, 12-m) is least at m=3
    fast = split(t, AUTO, MissCosts(copy_s=1.0, cpu_s=0.5)).sum()      # max(m/2, 12-m) at m=8
    assert (slow, fast) == (3, 8)


def test_experts_with_many_tokens_stay_on_the_device():
    # the CPU's cost grows with tokens, the copy's does not: the prefill-sized expert is copied
    on_cpu = split(tokens(1, 64, 1, 2), AUTO, MissCosts(copy_s=1.0, cpu_s=0.5, cpu_token_s=0.25))
    assert on_cpu.tolist() == [True, False, True, True]     # 3 CPU misses (1.75 s) vs 1 copy (1 s)


def test_the_cpu_path_s_fixed_cost_keeps_a_lone_miss_on_the_device():
    assert not split(tokens(1), AUTO, MissCosts(copy_s=1.0, cpu_s=0.6, cpu_fixed_s=0.5)).any()
    assert split(tokens(1), AUTO, MissCosts(copy_s=1.0, cpu_s=0.4, cpu_fixed_s=0.5)).all()


def test_ties_go_to_the_exact_device_path():
    assert not split(tokens(1, 1), AUTO, MissCosts(copy_s=1.0, cpu_s=2.0)).any()   # max(2, 1) = 2 = 2 copies


def test_the_predicted_finish_is_the_slower_half():
    on_cpu = np.empty(6, dtype=np.bool_)
    finish = split_misses(tokens(*[1] * 6), AUTO, 1.0, 0.5, 0.0, 0.0, 0.0, on_cpu)
    m = int(on_cpu.sum())
    assert m == 4 and finish == max(0.5 * m, 6 - m)
    assert split_misses(tokens(), AUTO, 1.0, 0.5, 0.0, 0.0, 0.0, np.empty(0, np.bool_)) == 0.0


def test_copy_work_queued_ahead_sends_more_misses_to_the_cpu():
    # 4 one-token misses, 1 s either way: with nothing queued 2 go to the CPU (2 s); behind 2 s of queued prefetch
    # copies a copied miss finishes at 3 s at best, so all 4 go to the CPU (4 s, no wait for the queue)...
    costs = MissCosts(copy_s=1.0, cpu_s=1.0)
    assert split(tokens(1, 1, 1, 1), AUTO, costs).sum() == 2
    assert split(tokens(1, 1, 1, 1), AUTO, costs, queued_s=2.0).sum() == 3      # max(3, 2 + 1) = 3 < 4
    assert split(tokens(1, 1, 1, 1), AUTO, costs, queued_s=5.0).sum() == 4      # 4 < 5 + 1
    # ...and the predicted finish counts the queue for the copied half only
    on_cpu = np.empty(4, dtype=np.bool_)
    assert split_misses(tokens(1, 1, 1, 1), GPU, 1.0, 1.0, 0.0, 0.0, 2.0, on_cpu) == 6.0
    assert split_misses(tokens(1, 1, 1, 1), AUTO, 1.0, 1.0, 0.0, 0.0, 5.0, on_cpu) == 4.0


def test_auto_is_never_slower_than_either_pure_mode():
    rng = np.random.default_rng(0)
    for _ in range(200):
        t = rng.integers(1, 20, rng.integers(1, 16)).astype(np.int64)
        c = MissCosts(copy_s=float(rng.uniform(0.1, 1)), cpu_s=float(rng.uniform(0.1, 1)),
                      cpu_token_s=float(rng.uniform(0, 0.2)), cpu_fixed_s=float(rng.uniform(0, 0.5)))
        out = np.empty(t.size, dtype=np.bool_)
        queued = float(rng.choice([0.0, rng.uniform(0, 2)]))
        auto = split_misses(t, AUTO, c.copy_s, c.cpu_s, c.cpu_token_s, c.cpu_fixed_s, queued, out)
        copies = (~out).sum()
        assert auto == pytest.approx(max(c.cpu_time(t[out]), queued + copies * c.copy_s if copies else 0.0))
        assert auto <= queued + t.size * c.copy_s and auto <= c.cpu_time(t) + 1e-12


def test_bad_modes_and_costs_are_refused_with_the_valid_values():
    assert [mode_code(m) for m in ("gpu", "cpu", "auto")] == [GPU, CPU, AUTO]
    with pytest.raises(ConfigError, match="gpu, cpu, auto"):
        mode_code("fast")
    with pytest.raises(ConfigError, match="cpu_s"):
        MissCosts(copy_s=1.0, cpu_s=-1.0)

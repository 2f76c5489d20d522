"""Experiment 1's measure: entropy of request-level vs iteration-level expert usage."""
from __future__ import annotations

import numpy as np
import pytest

from finemoe.eval.entropy import entropy_bits, iteration_starts, usage_entropy
from finemoe.traces import Trace


def _trace(choices: list[int], prompt_len: int, probs=None) -> Trace:
    n = len(choices)
    topk = np.array(choices, np.uint8).reshape(n, 1, 1)                   # 1 layer, top-1
    return Trace("m", 1, 4, 1, np.array([0, n]), np.array([prompt_len], np.int32),
                 np.array([n - prompt_len + 1], np.int32), np.zeros(n, np.int32), topk, probs=probs)


def test_entropy_bits_of_simple_distributions():
    assert entropy_bits(np.array([1.0, 0, 0, 0])) == pytest.approx(0.0)
    assert entropy_bits(np.array([2.0, 2.0, 0, 0])) == pytest.approx(1.0)      # unnormalised weights are fine
    assert entropy_bits(np.ones(8)) == pytest.approx(3.0)
    assert entropy_bits(np.zeros(4)) == pytest.approx(0.0)


def test_request_usage_is_spread_while_each_iteration_is_concentrated():
    # 1-token prompt, then 3 decode steps: experts 0, 1, 2, 3 -> each iteration one expert, the request all four
    r = usage_entropy(_trace([0, 1, 2, 3], prompt_len=1))
    assert r["iteration_bits"] == [pytest.approx(0.0)]
    assert r["request_bits"] == [pytest.approx(2.0)]
    assert r["max_bits"] == pytest.approx(2.0) and r["iterations"] == 4


def test_prefill_is_one_iteration_of_all_prompt_tokens():
    t = _trace([0, 1, 1], prompt_len=2)        # prefill = tokens {0, 1} -> 1 bit; decode = expert 1 -> 0 bits
    assert iteration_starts(t).tolist() == [0, 2]
    r = usage_entropy(t)
    assert r["iteration_bits"] == [pytest.approx(0.5)]
    assert r["request_bits"][0] == pytest.approx(entropy_bits(np.array([1.0, 2.0, 0, 0])))


def test_probability_weights_use_the_router_distribution():
    probs = np.array([[[0.5, 0.5, 0, 0]], [[0.5, 0.5, 0, 0]]], np.float16)
    r = usage_entropy(_trace([0, 1], prompt_len=1, probs=probs), weights="probs")
    assert r["iteration_bits"] == [pytest.approx(1.0)] and r["request_bits"] == [pytest.approx(1.0)]

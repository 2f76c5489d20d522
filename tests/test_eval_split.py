"""The build/held-out split, policy-variant names, and cutting a trace into a split's requests."""
from __future__ import annotations

import numpy as np
import pytest

from finemoe.errors import ConfigError, UnknownPolicyError
from finemoe.eval.split import split_indices
from finemoe.eval.traceops import select_requests
from finemoe.eval.variants import parse_variants
from finemoe.traces import Trace


def test_split_is_deterministic_disjoint_and_complete():
    build, held = split_indices(100, 0.7, seed=3)
    again_build, again_held = split_indices(100, 0.7, seed=3)
    assert np.array_equal(build, again_build) and np.array_equal(held, again_held)
    assert len(build) == 70 and len(held) == 30
    assert not set(build) & set(held)
    assert sorted(set(build) | set(held)) == list(range(100))
    other_build, _ = split_indices(100, 0.7, seed=4)
    assert not np.array_equal(build, other_build)


def test_split_keeps_both_sides_non_empty():
    build, held = split_indices(2, 0.99, seed=0)
    assert len(build) == 1 and len(held) == 1
    with pytest.raises(ConfigError, match="between 0 and 1"):
        split_indices(10, 1.0, seed=0)
    with pytest.raises(ConfigError, match="at least 2"):
        split_indices(1, 0.5, seed=0)


def test_variants_carry_options_and_labels():
    vs = parse_variants("finemoe/search=trajectory/capacity=100,lru")
    assert vs[0].label == "finemoe/search=trajectory/capacity=100"
    assert vs[0].policy == "finemoe" and vs[0].options == {"search": "trajectory", "capacity": 100}
    assert vs[0].with_distance(5)["prefetch_distance"] == 5 and vs[1].with_distance(5) == {}
    with pytest.raises(UnknownPolicyError):
        parse_variants("nosuchpolicy")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_variants("finemoe/search")


def test_select_requests_cuts_whole_requests():
    # request 0: prompt 2 tokens + 1 decode; request 1: prompt 1 token + 2 decodes
    topk = np.array([[[0]], [[1]], [[2]], [[3]], [[0]], [[1]]], np.uint8)
    t = Trace("m", 1, 4, 1, np.array([0, 3, 6]), np.array([2, 1], np.int32), np.array([2, 3], np.int32),
              np.arange(6, dtype=np.int32), topk, request_ids=["a", "b"])
    sub = select_requests(t, np.array([1]))
    assert sub.request_ids == ["b"] and sub.num_tokens == 3
    assert sub.topk[:, 0, 0].tolist() == [3, 0, 1] and sub.prompt_ids(0) == [3]

"""The build/held-out split and policy-variant names."""
from __future__ import annotations

import numpy as np
import pytest

from finemoe.errors import ConfigError, UnknownPolicyError
from finemoe.eval.split import split_indices
from finemoe.eval.variants import parse_variants


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


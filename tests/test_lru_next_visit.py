"""lru's `order=next_visit`: evict the expert whose layer runs farthest ahead (then the least recently used). When a
batch step needs more distinct experts than the cache holds, plain LRU cycles (every layer finds its experts just
evicted by the layers before it: no hits at all), next_visit keeps a fixed part resident; tokens are exact either
way."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_benchmark
from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.errors import ConfigError
from finemoe.models.default import default_tokenizer
from finemoe.models.loader import LoadedModel
from finemoe.policies.lru import LRUPolicy
from finemoe.policies.trackers import NextVisitState, RecencyState, touch_next_visit


def test_distances_follow_the_cyclic_layer_order():
    L, J = 4, 2
    state = NextVisitState(RecencyState(J, np.zeros(1), np.full(L * J, -1.0)), L, np.zeros(L * J))
    touch_next_visit(1, np.array([0], np.int64), np.array([1], np.int64), state)
    # after layer 1: layer 2 runs next (0 layers away), then 3, 0, and layer 1 itself last (3 away)
    assert state.ahead.reshape(L, J)[:, 0].tolist() == [-2.0, -3.0, -0.0, -1.0]
    assert state.recency.last_used[1 * J + 0] == 1.0


def test_bad_order_is_refused():
    with pytest.raises(ConfigError, match="lru: order 'mru' is not one of recency, next_visit"):
        LRUPolicy(order="mru")


def test_a_step_larger_than_the_cache_does_not_cycle():
    model = load_benchmark("benchmarks_common").build_model(6, 0, "cpu", True)   # 60 experts, top-4; tiny widths
    engine = Engine(LoadedModel(model, default_tokenizer(), "t", "t"),
                    EngineConfig(device="cpu", policy="resident", max_batch_size=8, show_progress=False))
    prompts = torch.randint(2, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    out = {}
    for order in ("recency", "next_visit"):
        engine.reconfigure("lru", "25%", {"order": order})       # 90 slots; a step needs ~26 per layer, 6 layers
        reqs = engine.generate(prompts, params)
        out[order] = ([r.output_ids for r in reqs], engine.summary(reqs))
    assert out["recency"][0] == out["next_visit"][0]
    assert out["recency"][1]["hit_rate"] < 0.05                  # LRU cycles
    assert out["next_visit"][1]["hit_rate"] > 0.15
    assert out["next_visit"][1]["bytes_copied"] < 0.9 * out["recency"][1]["bytes_copied"]

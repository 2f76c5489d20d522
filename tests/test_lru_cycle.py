"""lru counts recency in cycles over the layers (its default `order=cycle`): the expert whose layer has run most
often without it goes first, and among equals the one whose layer runs farthest ahead. When a batch step needs more
distinct experts than the cache holds, classic LRU (`order=recency`) cycles: every layer finds its experts just
evicted by the layers before it, and nothing hits; the cycle order keeps a fixed part resident. Tokens are exact
either way."""
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
from finemoe.policies.trackers import CycleState, touch_cycle


def cycle_state(L: int, J: int) -> CycleState:
    return CycleState(J, L, np.zeros(1), np.zeros(L), np.full(L * J, -1.0), np.full(L * J, -np.inf), np.zeros(L * J))


def visit(state: CycleState, layer: int, experts: list[int]) -> None:
    ids = np.array(experts, np.int64)
    touch_cycle(layer, ids, np.ones_like(ids), state)


def test_a_key_unused_at_its_layers_visits_grows_stale():
    L, J = 3, 2
    state = cycle_state(L, J)
    for step in range(3):                    # expert 0 of every layer used each step; expert 1 only at step 0
        for layer in range(L):
            visit(state, layer, [0, 1] if step == 0 else [0])
    stale = state.stale.reshape(L, J)
    assert stale[:, 0].tolist() == [0.0, 0.0, 0.0]           # used at its layer's last visit
    assert stale[:, 1].tolist() == [-2.0, -2.0, -2.0]        # two visits of its layer without it
    # after the last visit of layer 2, layer 0 runs next: its keys' next visit is the nearest
    assert state.ahead.reshape(L, J)[:, 0].tolist() == [-10.0, -11.0, -12.0]


def test_never_used_keys_go_first():
    state = cycle_state(2, 2)
    visit(state, 0, [1])
    assert state.stale.tolist() == [-np.inf, 0.0, -np.inf, -np.inf]


def test_bad_order_is_refused():
    with pytest.raises(ConfigError, match="lru: order 'mru' is not one of cycle, recency"):
        LRUPolicy(order="mru")


def test_a_step_larger_than_the_cache_does_not_cycle():
    model = load_benchmark("benchmarks_common").build_model(6, 0, "cpu", True)   # 60 experts, top-4; tiny widths
    engine = Engine(LoadedModel(model, default_tokenizer(), "t", "t"),
                    EngineConfig(device="cpu", policy="resident", max_batch_size=8, show_progress=False))
    prompts = torch.randint(2, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    out = {}
    for order in ("recency", "cycle"):
        engine.reconfigure("lru", "25%", {"order": order})       # 90 slots; a step needs ~26 per layer, 6 layers
        reqs = engine.generate(prompts, params)
        out[order] = ([r.output_ids for r in reqs], engine.summary(reqs))
    assert out["recency"][0] == out["cycle"][0]
    assert out["recency"][1]["hit_rate"] < 0.05                  # classic LRU cycles
    assert out["cycle"][1]["hit_rate"] > 0.15
    assert out["cycle"][1]["bytes_copied"] < 0.9 * out["recency"][1]["bytes_copied"]


def test_cycle_is_the_default_order():
    assert LRUPolicy().order == "cycle"

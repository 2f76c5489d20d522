"""--expert-budget auto and the device-memory check (engine/memory_fit.py), on the CPU with an injected free-memory
figure (EngineConfig.device_free_bytes): the cache takes what is left after the non-expert weights, the KV cache
for max_model_len x batch, CUDA graphs and the margin; a budget that does not fit is refused with the numbers.
Several --devices (two GPU names, a fake free figure each): the first also reserves the staging slots, the others
only the margin, and each device gets the slots its own memory leaves."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine import memory_fit as mf
from finemoe.errors import BudgetTooSmallError, ConfigError
from finemoe.experts.placement import place
from finemoe.models.adapters import find_moe_layers, geometry_of
from finemoe.models.default import build_default_model
from finemoe.models.random_shapes import random_config

LEN, BATCH = 64, 2


@pytest.fixture(scope="module")
def sizes():
    """The built-in model's non-expert bytes, KV bytes for LEN x BATCH (two static caches) and expert geometry."""
    model = build_default_model()
    layers = find_moe_layers(model)
    g = geometry_of(model, layers)
    kv = int(mf.kv_bytes_per_layer(model.config, torch.float32).sum()) * LEN * BATCH * 2
    return mf.non_expert_bytes(model, layers, torch.float32), kv, g


def free_leaving(room: int, held: int) -> int:
    """The smallest free figure that leaves `room` bytes after `held` bytes and the margin."""
    free = int((held + mf.MARGIN_BYTES + room) / (1 - mf.MARGIN_FRACTION)) + 1
    while free - int(free * mf.MARGIN_FRACTION) - mf.MARGIN_BYTES - held < room:
        free += 1
    return free


def free_for(slots: int, sizes) -> int:
    """The free figure that leaves exactly `slots` experts' bytes after everything else (margin included)."""
    non_expert, kv, g = sizes
    return free_leaving(slots * g.expert_bytes, non_expert + kv)


def engine(budget, free, **kw) -> Engine:
    return Engine.from_config(EngineConfig(device="cpu", expert_budget=budget, device_free_bytes=free,
                                           max_model_len=LEN, max_batch_size=BATCH, show_progress=False, **kw))


def test_auto_takes_what_is_left_and_says_so(sizes, capsys):
    g = sizes[2]
    e = engine("auto", free_for(100, sizes))
    assert e.cache.capacity == 100
    line = capsys.readouterr().err
    assert f"expert budget auto: 100 of {g.total_experts} experts" in line
    assert "non-expert weights" in line and f"max_model_len {LEN} x batch {BATCH}" in line
    out = e.generate(["Hello"], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert len(out[0].output_ids) == 3


def test_no_budget_with_a_device_figure_means_auto(sizes):
    assert engine(None, free_for(77, sizes)).cache.capacity == 77


def test_auto_is_capped_at_every_expert(sizes):
    g = sizes[2]
    assert engine("auto", free_for(g.total_experts * 3, sizes)).cache.capacity == g.total_experts


def test_auto_that_cannot_hold_one_layers_top_k_is_refused(sizes):
    g = sizes[2]
    with pytest.raises(BudgetTooSmallError) as err:
        engine("auto", free_for(g.top_k - 1, sizes))
    msg = str(err.value)
    assert "top-k" in msg and "KV cache" in msg and "--max-model-len" in msg and "\n" not in msg


def test_explicit_budget_that_does_not_fit_is_refused_with_the_numbers(sizes):
    g = sizes[2]
    free = free_for(50, sizes)
    assert engine(50 * g.expert_bytes, free).cache.capacity == 50
    with pytest.raises(ConfigError) as err:
        engine(51 * g.expert_bytes, free)
    assert "does not fit" in str(err.value) and "--expert-budget auto" in str(err.value)


def test_without_a_device_figure_the_cpu_keeps_every_expert(sizes):
    g = sizes[2]
    assert engine("auto", None).cache.capacity == g.total_experts
    assert engine(None, None).cache.capacity == g.total_experts


def test_the_kv_cache_counts_only_attention_layers_and_mla_heads():
    bf16 = torch.bfloat16
    # layers x key/value heads x (key + value dims) x 2 bytes
    assert mf.kv_bytes_per_layer(random_config("random:qwen3-30b-a3b"), bf16).sum() == 48 * 4 * 256 * 2
    assert mf.kv_bytes_per_layer(random_config("random:gpt-oss-20b"), bf16).sum() == 24 * 8 * 128 * 2
    assert mf.kv_bytes_per_layer(random_config("random:deepseek-v2-lite"), bf16).sum() == 27 * 16 * (192 + 128) * 2
    assert mf.kv_bytes_per_layer(random_config("random:qwen3-next-80b-a3b"), bf16).sum() == 12 * 2 * 512 * 2


@pytest.mark.parametrize("bad", [-1, 1.5, True, "lots"])
def test_a_bad_free_figure_is_rejected(bad):
    with pytest.raises(ConfigError, match="device_free_bytes"):
        EngineConfig(device="cpu", device_free_bytes=bad)


def test_one_figure_per_device_must_match_the_devices():
    assert EngineConfig(device="cpu", device_free_bytes=[10]).device_free_bytes == (10,)
    with pytest.raises(ConfigError, match="gives 2 figures for 1 device"):
        EngineConfig(device="cpu", device_free_bytes=(10, 20))
    with pytest.raises(ConfigError, match="device_free_bytes"):
        EngineConfig(device="cpu", device_free_bytes=(10, -1))


def test_a_per_device_figure_sizes_one_device_as_the_single_figure_does(sizes):
    assert engine("auto", (free_for(60, sizes),)).cache.capacity == 60


TWO = [torch.device("cuda:0"), torch.device("cuda:1")]


@pytest.fixture(scope="module")
def model_and_layers():
    model = build_default_model()
    return model, find_moe_layers(model)


def two_plans(model_and_layers, sizes, first_slots: int, second_slots: int):
    """Plans for cuda:0 and cuda:1 whose free figures leave exactly these many expert slots on each."""
    non_expert, kv, g = sizes
    staging = g.num_experts * g.expert_bytes
    free = [free_leaving(first_slots * g.expert_bytes, non_expert + kv + mf.GRAPH_RESERVE_BYTES + staging),
            free_leaving(second_slots * g.expert_bytes, 0)]
    cfg = EngineConfig(device="cpu", dtype="float32", max_model_len=LEN, max_batch_size=BATCH)
    return mf.plan(*model_and_layers, cfg, g, TWO, LEN, free)


def test_the_first_device_reserves_staging_and_the_others_only_the_margin(model_and_layers, sizes):
    non_expert, kv, g = sizes
    first, second = two_plans(model_and_layers, sizes, 30, 50)
    assert (first.non_expert, first.kv, first.graphs) == (non_expert, kv, mf.GRAPH_RESERVE_BYTES)
    assert first.staging == g.num_experts * g.expert_bytes            # one layer's peer-copy landing slots
    assert (second.non_expert, second.kv, second.graphs, second.staging) == (0, 0, 0, 0)
    assert second.for_experts == second.free - second.margin
    assert mf.slot_room([first, second], g).tolist() == [30, 50]
    one = mf.plan(*model_and_layers, EngineConfig(device="cpu", max_model_len=LEN, max_batch_size=BATCH), g,
                  TWO[:1], LEN, [first.free])
    assert one[0].staging == 0                                        # one device: no staging slots


def test_auto_over_two_devices_gives_each_the_slots_its_memory_leaves(model_and_layers, sizes):
    g = sizes[2]
    plans = two_plans(model_and_layers, sizes, 30, 50)
    choice = mf.resolve_budget(EngineConfig(device="cpu", expert_budget="auto"), g, plans)
    assert choice.budget == 50 * g.expert_bytes                        # per device: the most any device takes
    assert f"80 of {g.total_experts} experts" in choice.note and "over cuda:0 30 + cuda:1 50" in choice.note
    assert "cuda:0: " in choice.note and "staging slots" in choice.note and "\n" not in choice.note
    slots = np.minimum(choice.budget // g.expert_bytes, mf.slot_room(plans, g))   # as Engine._placement does
    p = place(("cuda:0", "cuda:1"), slots, g.total_experts, g.num_experts, np.zeros(g.num_layers, np.int64),
              np.arange(g.num_layers), "primary")
    assert (p.slots_on(0), p.slots_on(1), p.num_slots) == (30, 50, 80)


def test_auto_over_two_devices_is_capped_at_every_expert_the_last_giving_up_first(model_and_layers, sizes):
    g = sizes[2]
    plans = two_plans(model_and_layers, sizes, g.total_experts - 10, 50)
    choice = mf.resolve_budget(EngineConfig(device="cpu", expert_budget="auto"), g, plans)
    assert f"over cuda:0 {g.total_experts - 10} + cuda:1 10" in choice.note


def test_an_explicit_budget_must_fit_every_device_and_the_refusal_names_the_short_one(model_and_layers, sizes):
    g = sizes[2]
    plans = two_plans(model_and_layers, sizes, 30, 50)
    assert mf.resolve_budget(EngineConfig(device="cpu", expert_budget=30 * g.expert_bytes), g, plans).budget \
        == 30 * g.expert_bytes
    with pytest.raises(ConfigError) as err:
        mf.resolve_budget(EngineConfig(device="cpu", expert_budget=40 * g.expert_bytes), g, plans)
    msg = str(err.value)
    assert "per device) does not fit: cuda:0 needs 40 slots" in msg and "has room for 30" in msg
    assert "cuda:1 needs" not in msg and "--expert-budget auto" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=f"cuda:0 needs {g.total_experts} slots"):   # all on the first, none on
        mf.resolve_budget(EngineConfig(device="cpu", expert_budget="100%"), g, plans)   # the second

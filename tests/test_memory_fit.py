"""--expert-budget auto and the device-memory check (engine/memory_fit.py), on the CPU with an injected free-memory
figure (EngineConfig.device_free_bytes): the cache takes what is left after the non-expert weights, the KV cache
for max_model_len x batch, CUDA graphs and the margin; a budget that does not fit is refused with the numbers."""
from __future__ import annotations

import pytest
import torch

from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine import memory_fit as mf
from finemoe.errors import BudgetTooSmallError, ConfigError
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
    kv = mf.kv_bytes_per_token(model.config, torch.float32) * LEN * BATCH * 2
    return mf.non_expert_bytes(model, layers, torch.float32), kv, g


def free_for(slots: int, sizes) -> int:
    """The free figure that leaves exactly `slots` experts' bytes after everything else (margin included)."""
    non_expert, kv, g = sizes
    rest = non_expert + kv + mf.MARGIN_BYTES + slots * g.expert_bytes
    free = int(rest / (1 - mf.MARGIN_FRACTION)) + 1
    while free - int(free * mf.MARGIN_FRACTION) - mf.MARGIN_BYTES - non_expert - kv < slots * g.expert_bytes:
        free += 1
    return free


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
    assert mf.kv_bytes_per_token(random_config("random:qwen3-30b-a3b"), bf16) == 48 * 4 * 256 * 2
    assert mf.kv_bytes_per_token(random_config("random:gpt-oss-20b"), bf16) == 24 * 8 * 128 * 2
    assert mf.kv_bytes_per_token(random_config("random:deepseek-v2-lite"), bf16) == 27 * 16 * (192 + 128) * 2
    assert mf.kv_bytes_per_token(random_config("random:qwen3-next-80b-a3b"), bf16) == 12 * 2 * 512 * 2


@pytest.mark.parametrize("bad", [-1, 1.5, True, "lots"])
def test_a_bad_free_figure_is_rejected(bad):
    with pytest.raises(ConfigError, match="device_free_bytes"):
        EngineConfig(device="cpu", device_free_bytes=bad)

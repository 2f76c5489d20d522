"""Bad input gets a FineMoEError subclass whose message names the problem and the fix."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from finemoe import EngineConfig, FineMoEError, parse_budget
from finemoe.engine import Engine, SamplingParams
from finemoe.errors import BudgetTooSmallError, ConfigError, ModelLoadError, UnknownPolicyError, UnsupportedModelError
from finemoe.models.default import default_tokenizer
from helpers import CONFIGS, NUM_EXPERTS, TOP_K, VOCAB, save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen2-MoE checkpoint: 2 MoE layers x 8 experts, top-2."""
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("ckpt") / "qwen2_moe")


@pytest.fixture(scope="module")
def expert_bytes(tiny_dir):
    engine = Engine.from_config(EngineConfig(model=str(tiny_dir), device="cpu", show_progress=False))
    return engine.geometry.expert_bytes


def engine_for(model_dir, **kw) -> Engine:
    return Engine.from_config(EngineConfig(model=str(model_dir), device="cpu", show_progress=False, **kw))


def test_every_error_is_a_finemoe_error():
    for cls in (ConfigError, BudgetTooSmallError, UnknownPolicyError, ModelLoadError, UnsupportedModelError):
        assert issubclass(cls, FineMoEError)


def test_unsupported_architecture_names_it_and_the_reason(tmp_path):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    default_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as err:
        engine_for(tmp_path)
    msg = str(err.value)
    assert "'llama'" in msg and "LlamaForCausalLM" in msg
    assert "experts interface" in msg and "\n" not in msg


def test_budget_below_one_layers_top_k_says_the_minimum(tiny_dir, expert_bytes):
    minimum = TOP_K * expert_bytes
    with pytest.raises(BudgetTooSmallError) as err:
        engine_for(tiny_dir, expert_budget=minimum - 1)
    msg = str(err.value)
    assert f"--expert-budget {minimum}" in msg
    assert f"{TOP_K} experts" in msg
    assert engine_for(tiny_dir, expert_budget=minimum).cache.capacity == TOP_K   # the minimum itself works


def test_too_small_percentage_is_the_same_clear_error(tiny_dir, expert_bytes):
    # 5% of 16 experts is 0.8 experts
    with pytest.raises(BudgetTooSmallError, match=str(TOP_K * expert_bytes)):
        engine_for(tiny_dir, expert_budget="5%")


@pytest.mark.parametrize("budget", ["lots", "-5GiB", "0%", "150%", "5 parsecs", "", "0", "0GiB", "1e3", -3])
def test_malformed_budgets_are_rejected_with_the_accepted_forms(budget):
    with pytest.raises(ConfigError, match="expert budget"):
        EngineConfig(device="cpu", expert_budget=budget)


def test_budget_forms():
    total = 1000
    assert parse_budget(None, total) == total
    assert parse_budget("25%", total) == 250
    assert parse_budget("0.25", total) == 250
    assert parse_budget(0.5, total) == 500
    assert parse_budget("6GiB", total) == 6 * 2**30
    assert parse_budget("1.5GB", total) == 1_500_000_000
    assert parse_budget("512 MiB", total) == 512 * 2**20
    assert parse_budget(4096, total) == 4096


def test_unknown_policy_lists_the_available_ones():
    with pytest.raises(UnknownPolicyError) as err:
        EngineConfig(device="cpu", policy="clairvoyant-magic")
    msg = str(err.value)
    assert "'clairvoyant-magic'" in msg and "lru" in msg and "resident" in msg


def test_bad_policy_options_are_a_config_error(tiny_dir):
    with pytest.raises(UnknownPolicyError, match="bad options"):
        engine_for(tiny_dir, policy="lru", policy_options={"nope": 1})


@pytest.mark.parametrize("name", ["missing-dir", "empty-dir", "config-without-weights"])
def test_model_path_without_a_checkpoint_is_a_model_load_error(tmp_path, name):
    path = tmp_path / name
    if name == "empty-dir":
        path.mkdir()
    if name == "config-without-weights":
        CONFIGS["qwen2_moe"]().save_pretrained(path)
    with pytest.raises(ModelLoadError) as err:
        engine_for(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_resident_policy_refuses_a_partial_budget(tiny_dir):
    with pytest.raises(ConfigError) as err:
        engine_for(tiny_dir, policy="resident", expert_budget="50%")
    assert "100%" in str(err.value) and "'resident'" in str(err.value)
    assert engine_for(tiny_dir, policy="resident", expert_budget="100%").cache.capacity == 2 * NUM_EXPERTS


@pytest.fixture(scope="module")
def short_engine(tiny_dir):
    return engine_for(tiny_dir, expert_budget="25%", max_model_len=16)


@pytest.mark.parametrize("prompt", ["", []], ids=["empty-text", "no-token-ids"])
def test_empty_prompt_is_rejected(short_engine, prompt):
    with pytest.raises(ConfigError, match="empty"):
        short_engine.generate([prompt])


def test_prompt_too_long_names_the_limit(short_engine):
    with pytest.raises(ConfigError) as err:
        short_engine.generate(["x" * 12], SamplingParams(max_new_tokens=5))
    assert "12 tokens" in str(err.value) and "max_model_len 16" in str(err.value)
    assert len(short_engine.generate(["x" * 12], SamplingParams(max_new_tokens=4))[0].output_ids) <= 4


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}])
def test_bad_sampling_parameters(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs,match", [({"device": "tpu"}, "device"), ({"dtype": "int3"}, "dtype"),
                                          ({"max_batch_size": 0}, "max_batch_size"),
                                          ({"prefetch_inflight": 0}, "prefetch_inflight")])
def test_bad_engine_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**{"device": "cpu", **kwargs})


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", "hi", "--policy", "lru", "--map-store", "{tmp}/m.safetensors"],
     "--map-store is the finemoe policy's map store, not lru's"),
    (["generate", "--prompt", "hi", "--policy", "finemoe", "--map-store", "{tmp}"], "is a directory"),
    (["simulate", "--trace", "{tmp}", "--policy", "lru"], "is a directory"),
    (["generate", "--prompt", "hi", "--policy-option", "bogus=1"], "bad options ['bogus']"),
])
def test_misdirected_paths_and_values_name_the_problem(argv, message, tmp_path, capsys):
    from finemoe.cli.main import main
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


def test_a_limit_below_one_is_a_usage_error(tmp_path, capsys):
    from finemoe.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(["trace", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "t.safetensors"),
              "--limit", "0"])
    assert e.value.code == 2
    assert "argument --limit: invalid whole number >= 1 value: '0'" in capsys.readouterr().err


class IndexFirstRouter(torch.nn.Module):
    """A router returning (top_k_index, top_k_weights, logits), as granitemoehybrid's does under transformers 5.17."""

    def __init__(self, router: torch.nn.Module) -> None:
        super().__init__()
        self.inner = router

    def forward(self, hidden_states):
        logits, weights, index = self.inner(hidden_states)
        return index, weights, logits


def test_a_router_returning_another_order_is_refused_naming_the_order():
    from finemoe.models.adapters import find_moe_layers
    model = AutoModelForCausalLM.from_config(CONFIGS["qwen2_moe"]())
    block = model.model.layers[0].mlp
    block.gate = IndexFirstRouter(block.gate)
    with pytest.raises(UnsupportedModelError) as err:
        find_moe_layers(model)
    msg = str(err.value)
    assert "returns (top_k_index, top_k_weights, logits)" in msg and "upgrade transformers" in msg
    assert "\n" not in msg

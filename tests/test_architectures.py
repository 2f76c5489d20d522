"""Every supported architecture, saved with save_pretrained and loaded through finemoe's real loading path,
generates exactly the greedy tokens of plain transformers, at every budget, policy and batch size.

Budgets: the minimum (one layer's top-k experts: every layer evicts the last one's experts and batches
run in waves), 25% and 100% of all expert bytes. Batch 3 has prompts of different lengths, so rows
are left-padded. One engine serves batch 3 and then batch 1, so the second run starts from a warm cache.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.experts import hook
from helpers import CONFIGS, NUM_EXPERTS, PAD_ID, TOP_K, reference_greedy, save_tiny_checkpoint

PROMPTS = ["Hello", "The quick brown fox", "a"]   # 5, 19 and 1 byte-level tokens
MAX_NEW = 8
SETTINGS = [("min", "lru"), ("25%", "lru"), ("100%", "lru"), ("100%", "resident")]


class Tiny:
    """One architecture's checkpoint directory and plain transformers' greedy outputs for it."""

    def __init__(self, arch: str, root) -> None:
        self.arch = arch
        self.dir = save_tiny_checkpoint(arch, root / arch)
        model = AutoModelForCausalLM.from_pretrained(self.dir).eval()
        tok = AutoTokenizer.from_pretrained(self.dir)
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        self.want_batch = reference_greedy(model, ids, MAX_NEW, PAD_ID)
        self.want_single = reference_greedy(model, ids[1:2], MAX_NEW, PAD_ID)
        experts = [m.mlp.experts for m in model.model.layers if hasattr(m.mlp, "experts")]
        self.num_moe_layers = len(experts)
        per_expert = sum(p.numel() * p.element_size() for p in experts[0].parameters()) // NUM_EXPERTS
        self.expert_tensor_names = {name for name, _ in experts[0].named_parameters()}   # gpt_oss: + biases
        self.expert_bytes = per_expert
        self.total_bytes = per_expert * NUM_EXPERTS * self.num_moe_layers

    def engine(self, budget: str, policy: str) -> Engine:
        b = self.expert_bytes * TOP_K if budget == "min" else budget
        return Engine.from_config(EngineConfig(model=str(self.dir), device="cpu", expert_budget=b, policy=policy,
                                               show_progress=False))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory) -> Tiny:
    return Tiny(request.param, tmp_path_factory.mktemp("ckpt"))


def greedy(engine: Engine, prompts: list[str]) -> list[list[int]]:
    reqs = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("budget,policy", SETTINGS, ids=[f"{b}-{p}" for b, p in SETTINGS])
def test_greedy_tokens_equal_plain_transformers(tiny, budget, policy):
    engine = tiny.engine(budget, policy)
    slots = {"min": TOP_K, "25%": tiny.num_moe_layers * NUM_EXPERTS // 4,
             "100%": tiny.num_moe_layers * NUM_EXPERTS}[budget]
    assert engine.cache.capacity == slots
    assert greedy(engine, PROMPTS) == tiny.want_batch
    assert greedy(engine, PROMPTS[1:2]) == tiny.want_single
    t = engine.runtime.totals
    if policy == "resident":
        assert t.bytes_copied == 0                     # everything was loaded once, before the first request
    else:
        assert t.bytes_copied == t.misses.sum() * tiny.expert_bytes
    if budget == "min":
        assert t.hits.sum() < t.misses.sum()           # a 2-slot cache thrashes: the offload path really ran


def test_routing_is_not_degenerate(tiny):
    """With every expert cacheable, LRU's misses are exactly the distinct experts each layer used:
    the prompts must spread over most experts, or the parity test above would prove little."""
    engine = tiny.engine("100%", "lru")
    greedy(engine, PROMPTS)
    distinct = engine.runtime.totals.misses
    assert distinct.shape == (tiny.num_moe_layers,)
    assert (distinct >= NUM_EXPERTS - 2).all(), distinct.tolist()


def test_engine_runs_finemoe_experts_over_a_single_host_copy(tiny):
    """The finemoe implementation is active, the experts modules hold no weights (the host store owns
    them), and the store holds every routed expert exactly once."""
    engine = tiny.engine("25%", "lru")
    assert engine.model.config._experts_implementation == "finemoe"
    for layer in engine.layers:
        assert list(layer.experts.parameters()) == []
        assert list(layer.experts.buffers()) == []
        assert layer.experts.config._experts_implementation == "finemoe"
    g = engine.geometry
    assert (g.num_layers, g.num_experts, g.top_k, g.expert_bytes) == \
        (tiny.num_moe_layers, NUM_EXPERTS, TOP_K, tiny.expert_bytes)
    assert engine.store.nbytes == g.total_bytes == tiny.total_bytes
    assert all(set(layer) == tiny.expert_tensor_names for layer in engine.store.tensors)
    stored = [t.untyped_storage().data_ptr() for layer in engine.store.tensors for t in layer.values()]
    assert len(set(stored)) == len(stored)           # no two store tensors share (or duplicate) memory
    assert engine.pools.nbytes == engine.cache.capacity * g.expert_bytes
    # non-expert weights (attention, routers, shared experts, dense layers) are still on the model
    assert sum(p.numel() for p in engine.model.parameters()) > 0
    before = engine.runtime.totals.misses.sum()
    greedy(engine, PROMPTS[:1])
    assert engine.runtime.totals.misses.sum() > before  # and the forward pass went through the cache


def test_deepseek_v2_dense_and_shared_experts_stay_on_the_model(tmp_path):
    """DeepSeek-V2: the first_k_dense_replace layer is not an MoE layer, and shared experts stay resident."""
    path = save_tiny_checkpoint("deepseek_v2", tmp_path / "deepseek_v2")
    engine = Engine.from_config(EngineConfig(model=str(path), device="cpu", expert_budget="25%", show_progress=False))
    decoder = engine.model.model.layers
    assert [layer.decoder_index for layer in engine.layers] == [1, 2]
    assert engine.geometry.num_layers == 2
    assert not hasattr(decoder[0].mlp, "experts") and decoder[0].mlp.gate_proj.weight.numel() > 0
    for layer in decoder[1:]:
        assert sum(p.numel() for p in layer.mlp.shared_experts.parameters()) > 0
        assert list(layer.mlp.experts.parameters()) == []


def test_checkpoint_asking_for_router_logits_still_decodes(tmp_path):
    """Some configs set output_router_logits=True (a training option). transformers then computes an aux
    loss that fails during 1-token decode with a 2-D attention mask; the engine must not ask for it."""
    plain = Tiny("qwen2_moe", tmp_path / "plain")
    flagged = save_tiny_checkpoint("qwen2_moe", tmp_path / "flagged", output_router_logits=True)
    engine = Engine.from_config(EngineConfig(model=str(flagged), device="cpu", expert_budget="25%",
                                             show_progress=False))
    assert greedy(engine, PROMPTS) == plain.want_batch     # same seed, same weights as the plain checkpoint


def test_start_up_refuses_an_experts_module_that_would_not_run_finemoe():
    """transformers reads the implementation from each experts module's config: if one of them would
    fall back to another implementation, activation fails instead of silently running it."""
    model = AutoModelForCausalLM.from_config(CONFIGS["qwen2_moe"]())
    experts = [layer.mlp.experts for layer in model.model.layers]
    hook.activate(model, experts)                            # the shared config: fine
    stray = copy.deepcopy(model.config)
    stray._experts_implementation = "eager"
    experts[1].config = stray
    with pytest.raises(RuntimeError, match="eager"):
        hook.activate(model, experts)


def test_finemoe_experts_without_an_engine_refuse_to_run():
    model = AutoModelForCausalLM.from_config(CONFIGS["mixtral"]())
    model.set_experts_implementation("finemoe")
    with pytest.raises(RuntimeError, match="no finemoe engine is attached"):
        model(input_ids=torch.tensor([[1, 2, 3]]))

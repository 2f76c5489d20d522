"""The trained reference model (../shared/models/ref-moe: Qwen2-MoE, 12 layers, 60 experts, top-4, learned
routing) through the engine at a 25% expert budget: exact greedy tokens against plain transformers, on
real Arena-Hard prompts, with the measured hit rate printed.

Router-logits quirk (see the model's README): with output_router_logits=True, transformers' aux-loss
fails during 1-token decode with a 2-D attention mask. Its config leaves the flag off, so plain
generate() works, and the engine never asks for router logits.
"""
from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from helpers import reference_greedy

NUM_PROMPTS, PROMPT_TOKENS, MAX_NEW = 4, 64, 16


def arena_prompts(path, tokenizer) -> list[list[int]]:
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line, _ in zip(f, range(NUM_PROMPTS))]
    texts = [f"User: {r['prompt']}\n\nAssistant:" for r in records]
    return [tokenizer(t, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS] for t in texts]


def test_ref_moe_greedy_tokens_equal_transformers_at_quarter_budget(ref_moe_dir, arena_hard_prompts, record_property):
    tokenizer = AutoTokenizer.from_pretrained(ref_moe_dir)
    prompts = arena_prompts(arena_hard_prompts, tokenizer)
    assert len({len(p) for p in prompts}) > 1              # mixed lengths: rows are left-padded

    reference = AutoModelForCausalLM.from_pretrained(ref_moe_dir, dtype=torch.float32).eval()
    assert reference.config.output_router_logits is False
    want = reference_greedy(reference, prompts, MAX_NEW, tokenizer.pad_token_id)
    del reference

    engine = Engine.from_config(EngineConfig(model=str(ref_moe_dir), device="cpu", expert_budget="25%",
                                             policy="lru", show_progress=False))
    assert (engine.geometry.num_layers, engine.geometry.num_experts, engine.geometry.top_k) == (12, 60, 4)
    assert engine.cache.capacity == 180                     # 25% of 720 (layer, expert) pairs
    reqs = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    assert [r.output_ids for r in reqs] == want

    s = engine.summary(reqs)
    print(f"\nref-moe, lru, 25% budget ({engine.cache.capacity} of 720 experts), {len(prompts)} Arena-Hard prompts "
          f"<= {PROMPT_TOKENS} tokens + {MAX_NEW} new, batch {len(prompts)}: hit rate {s['hit_rate']:.3f} "
          f"({s['hits']} hits, {s['misses']} misses, {s['bytes_copied']} bytes copied)")
    record_property("ref_moe_lru_25pct_hit_rate", s["hit_rate"])
    assert s["hits"] > 0 and s["misses"] > 0
    assert 0.0 < s["hit_rate"] < 1.0

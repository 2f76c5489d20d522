"""The fast decode path (static KV cache, explicit masks; CUDA graphs on a GPU) is the plain path, faster.

On the CPU the fast path runs the very step a GPU captures, eagerly: same static cache, same masks, same
slot table. These tests pin down that it produces plain transformers' greedy tokens, that a finished row
of a fixed-size batch costs no expert copies, and that models it cannot serve fall back on their own.
"""
from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine.decoders import DynamicDecoder, StaticDecoder
from helpers import PAD_ID, reference_greedy, save_tiny_checkpoint

PROMPTS = ["Hello", "The quick brown fox", "a"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    # 1024 positions: a test below generates past the helpers' default 256, which the engine would refuse
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("fast") / "qwen2_moe",
                                max_position_embeddings=1024)


def engine_for(path, **kw) -> Engine:
    return Engine.from_config(EngineConfig(model=str(path), device="cpu", show_progress=False, **kw))


def run(engine: Engine, lengths: list[int]) -> list[list[int]]:
    reqs = [engine.make_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(PROMPTS, lengths)]
    return [r.output_ids for r in engine.run(reqs)]


@pytest.mark.parametrize("budget,policy", [("25%", "lru"), ("100%", "resident"), ("25%", "finemoe")])
def test_fast_path_tokens_equal_plain_transformers(qwen, budget, policy):
    model = AutoModelForCausalLM.from_pretrained(qwen).eval()
    tok = AutoTokenizer.from_pretrained(qwen)
    want = reference_greedy(model, [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS], 10, PAD_ID)
    engine = engine_for(qwen, expert_budget=budget, policy=policy)
    assert engine.decode_path == "eager, static KV cache"
    assert run(engine, [10, 10, 10]) == want
    assert run(engine, [10, 10, 10]) == want          # the second batch reuses the static cache (reset, not realloc)
    assert len(engine.paths.static) == 1


def test_a_finished_row_of_a_static_batch_costs_no_expert_loads(qwen):
    """Rows finish at 2, 9 and 5 tokens. The static batch keeps computing finished rows (fixed shape), the
    dynamic one drops them; both produce the same tokens and load exactly the same experts."""
    lengths = [2, 9, 5]
    fast, plain = engine_for(qwen, expert_budget="25%"), engine_for(qwen, expert_budget="25%", fast_path=False)
    assert run(fast, lengths) == run(plain, lengths)
    f, p = fast.runtime.totals, plain.runtime.totals
    assert (f.hits.tolist(), f.misses.tolist(), f.bytes_copied) == (p.hits.tolist(), p.misses.tolist(), p.bytes_copied)


def test_each_batch_shape_gets_one_static_cache_and_lengths_are_bucketed(qwen):
    engine = engine_for(qwen, expert_budget="25%")
    run(engine, [4, 4, 4])
    run(engine, [300, 4, 4])                     # needs more than one 256-token bucket
    assert sorted(engine.paths.static) == [(3, 256), (3, 512)]
    assert isinstance(engine.decoder_for([engine.make_request("x", SamplingParams())]), StaticDecoder)


def test_disabled_fast_path_and_sliding_window_models_use_the_dynamic_cache(qwen, tmp_path):
    engine = engine_for(qwen, expert_budget="25%", fast_path=False)
    assert isinstance(engine.decoder_for([engine.make_request("x", SamplingParams())]), DynamicDecoder)
    assert engine.decode_path.startswith("eager, dynamic KV cache (disabled")
    oss = engine_for(save_tiny_checkpoint("gpt_oss", tmp_path / "gpt_oss"), expert_budget="25%")
    assert "sliding-window" in oss.decode_path
    assert isinstance(oss.decoder_for([oss.make_request("x", SamplingParams())]), DynamicDecoder)


def test_summary_names_the_decode_path(qwen):
    engine = engine_for(qwen, expert_budget="25%")
    reqs = engine.generate(["Hello"], SamplingParams(max_new_tokens=3))
    assert engine.summary(reqs)["decode_path"] == "eager, static KV cache"


def test_prefill_lookahead_streams_the_next_layers_predicted_experts_and_keeps_tokens_exact(qwen):
    """With lookahead, an lru engine (which never prefetches on its own) copies the experts the next layer's
    router predicts while each layer computes; greedy tokens do not change."""
    plain = engine_for(qwen, expert_budget="25%")
    ahead = engine_for(qwen, expert_budget="25%", prefill_lookahead=True)
    assert run(ahead, [6, 6, 6]) == run(plain, [6, 6, 6])
    assert plain.cache.prefetch_copies == 0
    assert ahead.cache.prefetch_copies > 0


def test_resident_loading_waits_for_every_copy_before_the_first_request(qwen):
    """The resident path never waits per layer, so loading all experts must end with every copy landed
    (on CUDA the copies run on their own stream; a request right after reconfigure read half-copied slots)."""
    engine = engine_for(qwen, policy="resident")
    calls = []

    class Recording(type(engine.cache.transport)):
        def start_copy(self, slot, key):
            calls.append("copy")
            super().start_copy(slot, key)

        def finish_all(self):
            calls.append("finish")

    engine.cache.transport.__class__ = Recording
    engine.runtime.mark_resident_all()
    assert calls.count("copy") == engine.cache.capacity and calls[-1] == "finish"

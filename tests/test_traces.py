"""Routing traces: the versioned file format, the recorder in the engine, the FLAME-MoE adapter, `finemoe trace`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import require_shared
from finemoe import EngineConfig
from finemoe.cli.main import main
from finemoe.engine import Engine, SamplingParams
from finemoe.traces import FORMAT_VERSION, Trace, TraceError, load_trace
from finemoe.traces.format import HEADER_KEY


def small_trace(probs: bool = True) -> Trace:
    """2 requests: r0 has a 3-token prompt and 3 iterations (5 routed tokens), r1 a 1-token prompt and 2."""
    rng = np.random.default_rng(0)
    N, L, J, k = 7, 2, 5, 2
    topk = np.stack([np.stack([rng.choice(J, k, replace=False) for _ in range(L)]) for _ in range(N)])
    return Trace(model="tiny", num_layers=L, num_experts=J, top_k=k, offsets=np.array([0, 5, 7]),
                 prompt_lens=np.array([3, 1]), iterations=np.array([3, 2]), token_ids=np.arange(10, 17),
                 topk=topk, probs=rng.random((N, L, J)).astype(np.float16) if probs else None, expert_bytes=123,
                 request_ids=["a", "b"], prompt_texts=["hello", None])


def test_round_trip_keeps_every_array_and_header_field(tmp_path):
    t = small_trace()
    t.save(str(tmp_path / "t.safetensors"))
    u = load_trace(str(tmp_path / "t.safetensors"))
    for name in ("offsets", "prompt_lens", "iterations", "token_ids", "topk", "probs"):
        np.testing.assert_array_equal(getattr(u, name), getattr(t, name))
    assert u.topk.dtype == np.uint8 and u.probs.dtype == np.float16
    assert (u.model, u.num_layers, u.num_experts, u.top_k, u.expert_bytes) == ("tiny", 2, 5, 2, 123)
    assert u.request_ids == ["a", "b"] and u.prompt_texts == ["hello", None]
    assert not list(tmp_path.glob("*.tmp"))              # atomic save leaves no temp file


def test_iterations_are_prefill_then_one_token_each():
    t = small_trace()
    assert t.prompt_ids(0) == [10, 11, 12]
    assert [t.iteration_rows(0, i) for i in range(3)] == [(0, 3), (3, 4), (4, 5)]
    assert [t.iteration_rows(1, i) for i in range(2)] == [(5, 6), (6, 7)]


def test_trace_without_probs_round_trips(tmp_path):
    small_trace(probs=False).save(str(tmp_path / "t.safetensors"))
    assert not load_trace(str(tmp_path / "t.safetensors")).has_probs


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(str(tmp_path / "missing.safetensors"))
    save_file({"x": np.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(TraceError, match="not a finemoe trace"):
        load_trace(str(tmp_path / "plain.safetensors"))
    t = small_trace()
    header = {**t.header(), "format_version": FORMAT_VERSION + 1}
    save_file({"offsets": t.offsets}, str(tmp_path / "v2.safetensors"), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(TraceError, match="format version"):
        load_trace(str(tmp_path / "v2.safetensors"))


def test_inconsistent_arrays_are_rejected():
    t = small_trace()
    with pytest.raises(TraceError, match="prompt_len"):
        Trace("m", 2, 5, 2, np.array([0, 4, 7]), t.prompt_lens, t.iterations, t.token_ids, t.topk)
    with pytest.raises(TraceError, match="outside"):
        Trace("m", 2, 5, 2, t.offsets, t.prompt_lens, t.iterations, t.token_ids, t.topk + 4)


def test_flame_adapter_scatters_top6_scores_into_probs():
    path = require_shared("data", "traces", "flame_moe_290m.npz")
    raw = np.load(path)
    t = load_trace(str(path))
    assert (t.num_requests, t.num_tokens, t.num_layers, t.num_experts, t.top_k) == (4, 2048, 8, 64, 6)
    assert t.expert_bytes is None and t.prompt_lens.tolist() == [1] * 4 and t.iterations.tolist() == [512] * 4
    # request 1, token 7, layer 3 is row 512 + 7
    np.testing.assert_array_equal(t.topk[519, 3], raw["seq_topk_ids"][3, 1, 7])
    np.testing.assert_allclose(t.probs[519, 3][t.topk[519, 3]], raw["seq_topk_scores"][3, 1, 7], rtol=1e-3)
    assert np.count_nonzero(t.probs[519, 3]) == 6
    np.testing.assert_array_equal(t.token_ids[512:1024], raw["seq_tokens"][1])
    assert load_trace(f"{path}#first10").num_requests == 64
    both = load_trace(f"{path}#all")
    assert both.num_requests == 64 and both.num_tokens == 4 * 512 + 60 * 10
    with pytest.raises(TraceError, match="part"):
        load_trace(f"{path}#nope")


@pytest.fixture(scope="module")
def recorded():
    engine = Engine.from_config(EngineConfig(device="cpu", expert_budget="25%", policy="record", max_batch_size=2,
                                             show_progress=False))
    prompts = ["hello there", "a much longer prompt"]
    reqs = engine.generate(prompts, SamplingParams(max_new_tokens=5, ignore_eos=True))
    return engine, reqs, engine.policy.to_trace(engine.model_name, engine.geometry.expert_bytes)


def test_recorder_keeps_each_requests_tokens_and_iterations(recorded):
    engine, reqs, trace = recorded
    assert trace.num_requests == 2 and trace.iterations.tolist() == [5, 5]
    for r, req in enumerate(reqs):
        a, b = int(trace.offsets[r]), int(trace.offsets[r + 1])
        assert trace.prompt_lens[r] == len(req.prompt_ids)       # left padding dropped
        assert trace.token_ids[a:b].tolist() == req.prompt_ids + req.output_ids[:-1]


def test_recorder_topk_is_the_top_of_the_recorded_probs(recorded):
    engine, _, trace = recorded
    g = engine.geometry
    assert trace.topk.shape == (trace.num_tokens, g.num_layers, g.top_k)
    assert trace.probs.shape == (trace.num_tokens, g.num_layers, g.num_experts)
    top = np.take_along_axis(trace.probs.astype(np.float32), trace.topk.astype(np.int64), axis=-1)
    assert np.all(top.min(-1) >= np.sort(trace.probs.astype(np.float32), -1)[..., -g.top_k] - 1e-3)


def test_trace_cli_writes_a_loadable_trace(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "two words"}\n{"prompt": "unused"}\n')
    out = tmp_path / "t.safetensors"
    rc = main(["trace", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "3", "--limit", "2",
               "--device", "cpu", "--ignore-eos", "--template", "User: {prompt}\n\nAssistant:", "--no-probs"])
    assert rc == 0 and "2 requests" in capsys.readouterr().out
    t = load_trace(str(out))
    assert t.num_requests == 2 and not t.has_probs and t.prompt_texts == ["hi", "two words"]
    assert t.iterations.tolist() == [3, 3]

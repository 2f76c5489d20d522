"""`random:NAME[@LAYERS]` real shapes (models/random_shapes.py) and their GPU benchmark's CPU smoke run.

The shapes are built on the meta device (no memory): their parameter totals must match the published model
sizes, and their MoE geometry the published config. The benchmark's numbers that matter come from the GPU run.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import load_benchmark
from finemoe.errors import ModelLoadError
from finemoe.models.adapters import find_moe_layers, geometry_of
from finemoe.models.random_shapes import SHAPES, build_random

# name: (published total parameters in billions, MoE layers, routed experts, top-k)
PUBLISHED = {
    "qwen1.5-moe-a2.7b": (14.3, 24, 60, 4),
    "qwen3-30b-a3b": (30.5, 48, 128, 8),
    "gpt-oss-20b": (20.9, 24, 32, 4),
    "mixtral-8x7b": (46.7, 32, 8, 2),
    "deepseek-v2-lite": (15.7, 26, 64, 6),
    "olmoe-1b-7b": (6.9, 16, 64, 8),
    "glm-4.5-air": (106.0, 45, 128, 8),      # the MTP layer of the published checkpoint is not in transformers
    "qwen3.5-35b-a3b": (35.0, 40, 256, 8),   # text model only (the published one has a vision tower)
    "qwen3-next-80b-a3b": (80.0, 48, 512, 10),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_matches_the_published_model(name):
    try:
        model, label = build_random(f"random:{name}", "meta", torch.bfloat16)
    except ModelLoadError as e:   # an older transformers without the architecture
        pytest.skip(str(e))
    billions, moe_layers, experts, top_k = PUBLISHED[name]
    total = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(total - billions) / billions < 0.02, total
    g = geometry_of(model, find_moe_layers(model))
    assert (g.num_layers, g.num_experts, g.top_k) == (moe_layers, experts, top_k)
    assert "random" in label and "not trained" in label


def test_layer_override_and_bad_specs():
    model, _ = build_random("random:olmoe-1b-7b@2", "meta", torch.bfloat16)
    assert len(find_moe_layers(model)) == 2
    with pytest.raises(ModelLoadError, match="known: .*qwen3-30b-a3b"):
        build_random("random:qwen3-30b", "meta", torch.bfloat16)
    with pytest.raises(ModelLoadError, match="must be an integer >= 1"):
        build_random("random:olmoe-1b-7b@0", "meta", torch.bfloat16)


def test_benchmark_tiny_cpu_run_reports_every_shape(tmp_path):
    bench = load_benchmark("real_shapes_gpu")
    out = tmp_path / "real.json"
    report = bench.main(["--device", "cpu", "--tiny", "--shapes", "gpt-oss-20b,deepseek-v2-lite",
                         "--prompt-len", "6", "--new-tokens", "3", "--ckpt-dir", str(tmp_path), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["shape"] for r in saved["results"]] == ["gpt-oss-20b", "deepseek-v2-lite"]
    for r in saved["results"]:
        assert "error" not in r, r
        assert [row["policy"] for row in r["rows"]] == ["lru", "finemoe"]
        assert all(row["tpot_s"] > 0 and row["ttft_s"] > 0 for row in r["rows"])
        assert r["load"]["checkpoint_bytes"] > r["total_expert_bytes"] * r["load"]["layers"] / r["layers"] / 2
        assert r["load"]["load_GBps"] > 0 and r["peak_host_bytes"] > 0
    assert report["results"] == saved["results"]
    assert not list(tmp_path.glob("*-*/"))   # the load test removes its checkpoint


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_weight_is_initialised_and_the_experts_do_not_depend_on_the_thread_count(name):
    spec, over = load_benchmark("real_shapes_gpu").tiny_spec(name, 2)     # small widths, at most 16 experts
    built, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            built.append(build_random(spec, "cpu", torch.float32, 0, over)[0])
    except ModelLoadError as e:   # an older transformers without the architecture
        pytest.skip(str(e))
    finally:
        torch.set_num_threads(before)
    a, b = built
    std = a.config.initializer_range
    for layer in find_moe_layers(a):
        for p in layer.experts.parameters():
            if p.ndim >= 3:
                assert abs(p.std().item() - std) < 0.1 * std
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert not torch.isnan(p).any(), n
        assert not hasattr(p, "_is_hf_initialized"), n
        if p.ndim >= 3:
            assert torch.equal(p, q), n

"""Shared by the GPU benchmark scripts: the Qwen1.5-MoE-A2.7B-shaped random-weight model."""
from __future__ import annotations

import statistics
import time

import torch
from transformers import Qwen2MoeForCausalLM

from finemoe.models.default import default_tokenizer
from finemoe.models.loader import LoadedModel
from finemoe.models.random_shapes import build_random, qwen15_moe_a27b


def qwen15_moe_config(layers: int, tiny: bool = False):
    """Qwen1.5-MoE-A2.7B's shapes; `tiny` shrinks widths (CPU smoke runs of the scripts)."""
    cfg = qwen15_moe_a27b(layers)
    if tiny:
        cfg.hidden_size, cfg.moe_intermediate_size, cfg.intermediate_size = 128, 64, 256
        cfg.shared_expert_intermediate_size, cfg.vocab_size = 256, 8192
    return cfg


def build_model(layers: int, seed: int, device: str, tiny: bool) -> Qwen2MoeForCausalLM:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if not tiny:
        return build_random(f"random:qwen1.5-moe-a2.7b@{layers}", device, dtype, seed)[0]
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2MoeForCausalLM(qwen15_moe_config(layers, tiny))
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def median_seconds(fn, repeat: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` over `repeat` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def replayed_model(trace, device: str, tiny: bool) -> LoadedModel:
    """A Qwen1.5-MoE-shaped random bf16 model with the trace's layer count, to run with the trace's routing."""
    model = build_model(trace.num_layers, 0, device, tiny)
    return LoadedModel(model, default_tokenizer(), "qwen1.5-moe-shape-random",
                       f"Qwen1.5-MoE shape, {trace.num_layers} layers, random bf16, "
                       f"routing replayed from {trace.model}")

"""Shared by the GPU benchmark scripts: the Qwen1.5-MoE-A2.7B-shaped random-weight model."""
from __future__ import annotations

import json
import statistics
import time

import numpy as np
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


def device_name(device: str) -> str:
    """The GPU's name for a CUDA run, "cpu" otherwise (the label every result starts with)."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


class Progress:
    """One line per finished phase of a long benchmark, flushed at once with the seconds since start: a run cut off
    by a time limit still shows how far it got and what each phase cost."""

    def __init__(self, label: str) -> None:
        self.label, self.t0 = label, time.perf_counter()

    def __call__(self, what: str) -> None:
        print(f"[{self.label} {time.perf_counter() - self.t0:7.1f} s] {what}", flush=True)


def write_json(path: str | None, result: dict) -> None:
    """The full result as JSON at `path` (--out; nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


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


def serve_replayed(engine, replay, idx: list[int]) -> list:
    """Serve trace requests `idx` one at a time (batch 1) with their recorded routing -> the finished requests."""
    from finemoe.engine import SamplingParams
    reqs = []
    for r in idx:
        req = replay.request_for(r, SamplingParams())
        engine.run([req])
        reqs.append(req)
    return reqs


def demand_load_gbps(engine, layers: int | None = None) -> float:
    """GB/s of one layer's experts loaded through the cache's demand path (all misses), timed on the copy stream
    with CUDA events; the median over up to 6 layers, the first left out as warm-up when there are more."""
    J = engine.geometry.num_experts
    layers = engine.geometry.num_layers if layers is None else layers
    engine.reconfigure("lru", J * engine.geometry.expert_bytes)
    tr, rates = engine.cache.transport, []
    for layer in range(min(layers, 6)):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(tr.stream)
        res = engine.cache.acquire(layer, np.arange(J))
        b.record(tr.stream)
        b.synchronize()
        engine.cache.release(res.slots)
        rates.append(J * engine.geometry.expert_bytes / (a.elapsed_time(b) / 1e3) / 1e9)
    return statistics.median(rates[1:] if len(rates) > 1 else rates)

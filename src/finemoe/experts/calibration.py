"""What a missed expert costs each way on this machine, measured at engine start (`--miss-compute cpu|auto`):
the MissCosts that experts/miss_split.py splits a layer's misses by.

Measured on layer 0's experts of the real model (its host tensors, its own eager experts function):
  copy_s       one expert host -> device: pinned copies on a side stream timed with CUDA events (on a CPU
               device: the synchronous copy into a slot-sized buffer, wall time)
  cpu_s, cpu_token_s
               an expert on the CPU, cold (a different one each call), for 1, 4 and 16 tokens with torch's current
               threads (wall time, median), fitted by least squares to cpu_s + cpu_token_s * (tokens - 1), for each
               candidate weight dtype of `--cpu-expert-dtype` (experts/cpu_weights.py); the faster at one token is kept
  cpu_fixed_s  the CPU path's per-layer round trip: one token's hidden state to a pinned host buffer (synced)
               and a result back (non_blocking, synced); on a CPU device the token gather and the add
Medians of a few repeats after a warm-up; the whole measurement takes well under a second for
Qwen1.5-MoE-sized experts. The numbers vary from run to run by the usual timing noise: they choose a split,
they do not change any result beyond which half computes a miss.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from finemoe.experts.cpu_weights import float32_fits
from finemoe.experts.hook import SlotExperts, eager_compute_fn
from finemoe.experts.host_store import HostExpertStore
from finemoe.experts.miss_split import MissCosts

TOKENS = (1, 4, 16)
REPEAT = 5
COLD_EXPERTS = 8      # distinct experts cycled by the CPU measurement (8 Qwen1.5-MoE experts: 138 MB bf16, 277 MB fp32)


def _median_s(fn: Callable[[], float], repeat: int = REPEAT) -> float:
    """fn() returns seconds; one warm-up call, then the median of `repeat`."""
    fn()
    return statistics.median(fn() for _ in range(repeat))


def _wall(fn: Callable[[], object]) -> Callable[[], float]:
    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return timed


def copy_seconds(store: HostExpertStore, device: torch.device) -> float:
    """One expert (layer 0, expert 0) host -> device."""
    src = {name: t[0] for name, t in store.tensors[0].items()}
    dst = {name: torch.empty_like(t, device=device) for name, t in src.items()}

    def copy() -> None:
        for name, t in src.items():
            dst[name].copy_(t, non_blocking=True)

    if device.type != "cuda":
        return _median_s(_wall(copy))
    stream = torch.cuda.Stream(device)

    def timed() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            copy()
            end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return _median_s(timed)


def cpu_seconds(store: HostExpertStore, experts: nn.Module, hidden_size: int,
                dtype: torch.dtype | None = None) -> dict[int, float]:
    """tokens -> seconds to compute one of layer 0's experts on the CPU for that many tokens, with its weights and
    inputs in `dtype` (default: the store's): the model's eager experts function, as the runtime's CPU path runs it.
    Cold, as a missed expert is: the calls cycle through COLD_EXPERTS distinct experts, so the weights come from
    memory, not from a cache warmed by the previous call (one expert's weights fit the last-level cache of a server
    CPU: timing one expert again and again put the H100 host's fp32 expert at 0.30 ms, the engine then measured
    0.8 ms)."""
    dtype = dtype or store.dtype
    J = next(iter(store.tensors[0].values())).shape[0]
    n = min(J, COLD_EXPERTS)
    view = SlotExperts(experts, {name: t[:n].to(dtype) for name, t in store.tensors[0].items()})   # [n, ...]
    fn = eager_compute_fn(experts)
    gen = torch.Generator().manual_seed(0)
    out, calls = {}, iter(range(1 << 30))
    for t in TOKENS:
        x = torch.randn(t, hidden_size, generator=gen).to(dtype)          # [t, H]
        w = torch.ones((t, 1), dtype=dtype)                               # [t, 1]

        def one(x=x, w=w) -> object:
            idx = torch.full((x.shape[0], 1), next(calls) % n, dtype=torch.int64)   # [t, 1] the next expert
            return fn(view, x, idx, w)
        out[t] = _median_s(_wall(one))
    return out


def round_trip_seconds(hidden_size: int, dtype: torch.dtype, device: torch.device) -> float:
    """The CPU path's fixed cost per layer: a token's hidden state to the host and a result back."""
    hidden = torch.randn(4, hidden_size, device=device).to(dtype)       # [T, H]
    tokens = torch.tensor([0], device=device)
    cuda = device.type == "cuda"

    def trip() -> None:
        host = torch.empty((1, hidden_size), dtype=dtype, pin_memory=cuda)
        host.copy_(hidden.index_select(0, tokens), non_blocking=cuda)
        if cuda:
            torch.cuda.current_stream(device).synchronize()               # HOST SYNC (measured)
        hidden.index_add_(0, tokens, host.to(device, non_blocking=cuda))
        if cuda:
            torch.cuda.current_stream(device).synchronize()
    return _median_s(_wall(trip))


def fit_token_cost(seconds: dict[int, float]) -> tuple[float, float]:
    """{tokens: s} -> (cpu_s, cpu_token_s): least squares of s = cpu_s + cpu_token_s * (tokens - 1), both >= 0."""
    t = np.array(sorted(seconds), dtype=np.float64)
    s = np.array([seconds[int(k)] for k in t])
    a = np.stack([np.ones_like(t), t - 1], axis=1)                       # [n, 2]
    (base, per_token), *_ = np.linalg.lstsq(a, s, rcond=None)
    per_token = max(float(per_token), 0.0)
    base = float(base) if base > 0 else float(s[0])
    return base, per_token


@dataclass(frozen=True)
class Calibration:
    """What the engine measured at start: the costs it splits by, the CPU half's dtype (chosen by `--cpu-expert-dtype`)
    and the CPU time of one expert per candidate dtype and token count (seconds)."""

    costs: MissCosts
    cpu_dtype: torch.dtype
    cpu_s_by_dtype: dict[str, dict[int, float]]


def calibrate(store: HostExpertStore, experts: nn.Module, hidden_size: int, device: torch.device,
              cpu_dtype: str = "model") -> Calibration:
    """Measure, with torch's current CPU threads: the copy, the round trip and the CPU time for the candidate dtypes
    of `cpu_dtype` (experts/cpu_weights.py: auto measures the model's and float32, float32 only when its copy
    fits in host memory), keeping the faster at one token."""
    model_dtype = store.dtype
    candidates = {"model": [model_dtype], "float32": [torch.float32],
                  "auto": [model_dtype] + ([torch.float32] if model_dtype != torch.float32 and float32_fits(store)
                                           else [])}[cpu_dtype]
    with torch.inference_mode():
        copy_s = copy_seconds(store, device)
        by_dtype = {dtype: cpu_seconds(store, experts, hidden_size, dtype) for dtype in candidates}
        fixed_s = round_trip_seconds(hidden_size, model_dtype, device)
    best = min(candidates, key=lambda d: by_dtype[d][1])
    cpu_s, cpu_token_s = fit_token_cost(by_dtype[best])
    return Calibration(MissCosts(copy_s, cpu_s, cpu_token_s, fixed_s), best,
                       {str(d).removeprefix("torch."): s for d, s in by_dtype.items()})


def describe(costs: MissCosts, threads: int, cpu_dtype: torch.dtype | None = None) -> str:
    """One line for stderr at start."""
    dtype = f", {str(cpu_dtype).removeprefix('torch.')} weights" if cpu_dtype is not None else ""
    return (f"copy {costs.copy_s * 1e3:.3f} ms/expert; CPU {costs.cpu_s * 1e3:.3f} ms/expert "
            f"+ {costs.cpu_token_s * 1e3:.3f} ms/extra token, {costs.cpu_fixed_s * 1e3:.3f} ms/layer round trip "
            f"({threads} CPU threads{dtype})")

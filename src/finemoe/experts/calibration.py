"""What a missed expert costs each way on this machine, measured at engine start (`--miss-compute cpu|auto`):
the MissCosts that experts/miss_split.py splits a layer's misses by.

Measured on layer 0's experts of the real model (its host tensors, its own eager experts function):
  copy_s       one expert host -> device: pinned copies on a side stream timed with CUDA events (on a CPU
               device: the synchronous copy into a slot-sized buffer, wall time)
  cpu_s, cpu_token_s
               an expert on the CPU, cold (a different one each call), for 1, 4 and 16 tokens with torch's current
               threads (wall time, median), fitted by least squares to cpu_s + cpu_token_s * (tokens - 1), for each
               candidate kernel of `--cpu-kernel` (experts/cpu_kernel.py: torch in each weight dtype of
               `--cpu-expert-dtype`, experts/cpu_weights.py; kt-kernel, experts/kt_experts.py, after checking its
               agreement with torch in float32); the fastest at one token is kept
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
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from finemoe.errors import ConfigError
from finemoe.experts.cpu_kernel import CpuExpertKernel, TorchKernel, relative_error, torch_kernel_name
from finemoe.experts.cpu_weights import copy_bytes, float32_fits, fits
from finemoe.experts.host_store import HostExpertStore
from finemoe.experts.kt_experts import KtKernel
from finemoe.experts.miss_split import MissCosts

TOKENS = (1, 4, 16)
REPEAT = 5
COLD_EXPERTS = 8      # distinct experts cycled by the CPU measurement (8 Qwen1.5-MoE experts: 138 MB bf16, 277 MB fp32)
KT_TOLERANCE = 3e-2   # kt-kernel's largest relative error against torch in float32 (bf16 math: about 5e-3 measured)


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
    """One expert's copy (layer 0, expert 0: what the transport moves, `store.expert_sources`) host -> device."""
    src = store.expert_sources(0, 0)
    dst = [torch.empty_like(t, device=device) for t in src]

    def copy() -> None:
        for d, t in zip(dst, src):
            d.copy_(t, non_blocking=True)

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


def cold_count(store: HostExpertStore) -> int:
    """How many distinct experts the CPU measurement cycles through: COLD_EXPERTS, or layer 0's all if fewer."""
    return min(next(iter(store.tensors[0].values())).shape[0], COLD_EXPERTS)


def layer0_subset(store: HostExpertStore, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Layer 0's first cold_count experts' host tensors [n, ...] (in `dtype`; default: the store's)."""
    n = cold_count(store)
    return {name: t[:n].to(dtype or store.dtype) for name, t in store.tensors[0].items()}


def kernel_seconds(kernel: CpuExpertKernel, num_experts: int, hidden_size: int,
                   dtype: torch.dtype = torch.float32) -> dict[int, float]:
    """tokens -> seconds for `kernel` to compute one of layer 0's first `num_experts` experts for that many tokens
    (inputs in `dtype`). Cold, as a missed expert is: the calls cycle through the `num_experts` distinct experts, so
    the weights come from memory, not from a cache warmed by the previous call (one expert's weights fit the
    last-level cache of a server CPU: timing one expert again and again put the H100 host's fp32 expert at 0.30 ms,
    the engine then measured 0.8 ms)."""
    gen = torch.Generator().manual_seed(0)
    out, calls = {}, iter(range(1 << 30))
    for t in TOKENS:
        x = torch.randn(t, hidden_size, generator=gen).to(dtype)          # [t, H]
        w = torch.ones((t, 1), dtype=dtype)                               # [t, 1]

        def one(x=x, w=w) -> object:
            idx = torch.full((x.shape[0], 1), next(calls) % num_experts, dtype=torch.int64)   # [t, 1] the next expert
            return kernel.compute(0, x, idx, w)
        out[t] = _median_s(_wall(one))
    return out


def cpu_seconds(store: HostExpertStore, experts: nn.Module, hidden_size: int,
                dtype: torch.dtype | None = None) -> dict[int, float]:
    """tokens -> seconds for the torch kernel (the model's eager experts function, as the runtime's CPU path runs it)
    to compute one of layer 0's experts, cold, weights and inputs in `dtype` (default: the store's)."""
    dtype = dtype or store.dtype
    subset = layer0_subset(store, dtype)
    return kernel_seconds(TorchKernel([experts], [subset], dtype), cold_count(store), hidden_size, dtype)


def kt_probe(store: HostExpertStore, experts: nn.Module, hidden_size: int) -> tuple[KtKernel, float]:
    """kt-kernel over layer 0's first experts and its relative error against torch in float32 on the same inputs;
    ConfigError (one line) when it is missing, cannot run these experts, or errs beyond KT_TOLERANCE."""
    subset = layer0_subset(store)
    probe = KtKernel(experts, [subset], torch.get_num_threads())
    reference = TorchKernel([experts], [{k: v.float() for k, v in subset.items()}], torch.float32)
    err = relative_error(probe, reference, cold_count(store), hidden_size)
    if not err <= KT_TOLERANCE:
        raise ConfigError(f"--cpu-kernel kt-kernel: its results differ from torch's by {err:.1e} (relative, more "
                          f"than {KT_TOLERANCE:.0e}) on this model's experts; use --cpu-kernel torch")
    return probe, err


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
    """What the engine measured at start: the costs it splits by, the CPU kernel and weight dtype chosen
    (`--cpu-kernel`, `--cpu-expert-dtype`), and the CPU time of one expert per candidate and token count (seconds):
    `cpu_s_by_dtype` for torch's candidates by weight dtype, `cpu_s_by_kernel` for every candidate by its name
    (e.g. torch-float32, kt-kernel-bf16). `kt_error`: kt-kernel's relative error against torch in float32 when it
    was measured; `kt_skipped`: why `auto` left it out (None: it was a candidate, or not asked for)."""

    costs: MissCosts
    cpu_dtype: torch.dtype
    cpu_s_by_dtype: dict[str, dict[int, float]]
    kernel: str = "torch"
    cpu_s_by_kernel: dict[str, dict[int, float]] = field(default_factory=dict)
    kt_error: float | None = None
    kt_skipped: str | None = None


def calibrate(store: HostExpertStore, experts: nn.Module, hidden_size: int, device: torch.device,
              cpu_dtype: str = "model", cpu_kernel: str = "torch") -> Calibration:
    """Measure, with torch's current CPU threads (kt-kernel: as many in its own pool): the copy, the round trip and
    the CPU time of each candidate kernel, keeping the fastest at one token. Candidates: `torch` in the weight dtypes
    of `cpu_dtype` (experts/cpu_weights.py: auto measures the model's and float32, float32 only when its copy fits
    in host memory); `kt-kernel` (experts/kt_experts.py, only when its bf16 copy fits, it imports and it agrees
    with torch within KT_TOLERANCE); `auto` both, leaving out kt-kernel where it cannot run (`kt_skipped` says
    why). An explicit `kt-kernel` that cannot run raises ConfigError."""
    model_dtype = store.dtype
    dtypes = [] if cpu_kernel == "kt-kernel" else {
        "model": [model_dtype], "float32": [torch.float32],
        "auto": [model_dtype] + ([torch.float32] if model_dtype != torch.float32 and float32_fits(store) else [])
    }[cpu_dtype]
    kt_error = kt_skipped = None
    with torch.inference_mode():
        copy_s = copy_seconds(store, device)
        by_dtype = {dtype: cpu_seconds(store, experts, hidden_size, dtype) for dtype in dtypes}
        torch_names = {torch_kernel_name(d): d for d in by_dtype}       # torch's candidates: name -> weight dtype
        by_kernel = {name: by_dtype[d] for name, d in torch_names.items()}
        if cpu_kernel != "torch":
            try:
                if not fits(copy_bytes(store, torch.bfloat16)):
                    raise ConfigError("--cpu-kernel kt-kernel: its bf16 copy of the experts does not fit in host "
                                      "memory; use --cpu-kernel torch")
                probe, kt_error = kt_probe(store, experts, hidden_size)
                by_kernel[probe.name] = kernel_seconds(probe, cold_count(store), hidden_size)
            except ConfigError as e:
                if cpu_kernel == "kt-kernel":
                    raise
                kt_skipped = str(e)
        fixed_s = round_trip_seconds(hidden_size, model_dtype, device)
    best = min(by_kernel, key=lambda k: by_kernel[k][1])
    kernel, chosen_dtype = ("torch", torch_names[best]) if best in torch_names else ("kt-kernel", torch.bfloat16)
    cpu_s, cpu_token_s = fit_token_cost(by_kernel[best])
    return Calibration(MissCosts(copy_s, cpu_s, cpu_token_s, fixed_s), chosen_dtype,
                       {str(d).removeprefix("torch."): s for d, s in by_dtype.items()}, kernel, by_kernel,
                       kt_error, kt_skipped)


def describe(calibration: Calibration, threads: int) -> str:
    """One line for stderr at start: the costs, the kernel (torch: its weight dtype), and with several candidates
    (or kt-kernel) each one's one-token time."""
    costs = calibration.costs
    kernel = (f"{str(calibration.cpu_dtype).removeprefix('torch.')} weights" if calibration.kernel == "torch"
              else calibration.kernel)
    if len(calibration.cpu_s_by_kernel) > 1 or calibration.kernel != "torch":
        kernel += "; 1 token: " + ", ".join(f"{k} {s[1] * 1e3:.3f} ms" for k, s in calibration.cpu_s_by_kernel.items())
        if calibration.kt_error is not None:
            kernel += f"; kt-kernel rel. error {calibration.kt_error:.1e}"
    return (f"copy {costs.copy_s * 1e3:.3f} ms/expert; CPU {costs.cpu_s * 1e3:.3f} ms/expert "
            f"+ {costs.cpu_token_s * 1e3:.3f} ms/extra token, {costs.cpu_fixed_s * 1e3:.3f} ms/layer round trip "
            f"({threads} CPU threads, {kernel})")

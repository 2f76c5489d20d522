"""The CPU half's expert kernels (`--cpu-kernel torch|kt-kernel|auto`): what computes a missed expert on the host.

Contract (`CpuExpertKernel.compute(layer, x, row_expert, w) -> rows`):
  x           [R, H] host, any float dtype: each row's token hidden state
  row_expert  [R, 1] int64 host: each row's expert in [0, J) of layer `layer`
  w           [R, 1] host: each row's routing weight
  returns     [R, H] host: each row's expert MLP output times its weight, in the kernel's dtype (`out_dtype`)
Kernels:
  torch      (TorchKernel, here) the model's own eager experts function over a host view of the layer in the CPU
             half's weight dtype (--cpu-expert-dtype, experts/cpu_weights.py): torch's CPU matmuls
  kt-kernel  (experts/kt_experts.py) kTransformers' BF16 MoE kernel (AMX or AVX-512 BF16) over its own packed copy
             of the experts; only for SwiGLU experts stored as gate_up_proj [J, 2I, H] and down_proj [J, H, I]
  auto       whichever computes one token fastest in the start-up calibration (experts/calibration.py)
Every kernel is approximate against the device path (CPU math); calibration checks a kernel's agreement with
torch in float32 on the same inputs before it may be chosen.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from finemoe.errors import ConfigError

CPU_KERNELS = ("torch", "kt-kernel", "auto")


def check_cpu_kernel(name: str) -> str:
    """`name` if it is a --cpu-kernel choice, else a one-line ConfigError listing them (config.py validates with it:
    this module imports no transformers at module level, so neither does the config, nor the simulator)."""
    if name not in CPU_KERNELS:
        raise ConfigError(f"--cpu-kernel {name!r} is not one of {', '.join(CPU_KERNELS)} (auto: the fastest at start)")
    return name


class CpuExpertKernel(Protocol):
    name: str                 # e.g. "torch-float32", "kt-kernel-bf16": what the start-up line and reports print
    out_dtype: torch.dtype    # the dtype of `compute`'s rows

    def compute(self, layer: int, x: torch.Tensor, row_expert: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ...


def torch_kernel_name(dtype: torch.dtype) -> str:
    """The torch kernel's name in `dtype` (e.g. torch-float32): what calibration and the start-up line call it."""
    return f"torch-{str(dtype).removeprefix('torch.')}"


class TorchKernel:
    """The model's eager experts function over host weights [J, ...] per layer, in `dtype` (inputs cast to it)."""

    def __init__(self, experts: list[nn.Module], weights: list[dict[str, torch.Tensor]], dtype: torch.dtype) -> None:
        """experts[l]: layer l's experts module (its attributes and forward); weights[l][name] [J, ...] host."""
        from finemoe.experts.hook import SlotExperts, eager_compute_fn   # transformers: only when a kernel is built

        self.dtype = self.out_dtype = dtype
        self.name = torch_kernel_name(dtype)
        self.views = [SlotExperts(m, w) for m, w in zip(experts, weights, strict=True)]
        self.fns = [eager_compute_fn(m) for m in experts]

    def compute(self, layer: int, x: torch.Tensor, row_expert: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.fns[layer](self.views[layer], x.to(self.dtype), row_expert, w.to(self.dtype))   # [R, H]


def relative_error(kernel: CpuExpertKernel, reference: CpuExpertKernel, num_experts: int, hidden_size: int,
                   seed: int = 0) -> float:
    """max |kernel - reference| / max |reference| over two rows per expert of layer 0's first `num_experts` (random
    inputs and weights, fp32 on both sides): how far `kernel` is from `reference` on the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * num_experts
    x = torch.randn(rows, hidden_size, generator=gen)                               # [R, H]
    idx = (torch.arange(rows) % num_experts).unsqueeze(1)                          # [R, 1]
    w = torch.rand(rows, 1, generator=gen) + 0.5                                   # [R, 1]
    with torch.inference_mode():
        got = kernel.compute(0, x, idx, w).float()
        want = reference.compute(0, x, idx, w).float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))

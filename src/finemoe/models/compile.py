"""Kernel fusion for the decode step: `torch.compile` transformers' small modules, through the public
`nn.Module.compile()` (no patching). A batch-1 decode step of Qwen1.5-MoE-A2.7B's shape launches about
2,200 kernels, most of them tiny elementwise ones (counted with the torch profiler); the norms,
the rotary embedding and the MLPs account for many of them. Experts are not compiled: they run
transformers' own experts function over the slot pools (exactness), and attention holds the KV cache.
"""
from __future__ import annotations

from torch import nn

FUSED_SUFFIXES = ("RMSNorm", "RotaryEmbedding", "MLP")


def compile_small_modules(model: nn.Module) -> int:
    """Compile every module whose class name ends with one of FUSED_SUFFIXES; returns how many."""
    n = 0
    for m in model.modules():
        if type(m).__name__.endswith(FUSED_SUFFIXES):
            m.compile()
            n += 1
    return n

"""The host tensors the CPU half of a hybrid layer computes from (`--cpu-expert-dtype auto|model|float32`).

  model    the host expert store itself: pinned, in the model's dtype (bf16 for the real checkpoints)
  float32  an fp32 copy of every expert, made once, when a configuration first computes misses on the CPU
           (unpinned; twice the store's bytes for a bf16 model). At one token an expert's MLP is a matrix-vector
           product that reads every weight once: torch's fp32 CPU kernels stream their weights faster than its bf16
           ones convert them (docs/BENCHMARKS.md, "A miss each way")
  auto     (default) whichever of the two computes layer 0's expert 0 for one token faster on this machine
           (experts/calibration.py), float32 only when its copy fits in HOST_MEMORY_SHARE of the host's available
           memory; the choice is printed at start with the calibration
Both compute in the CPU half's dtype and hand back results in the model's dtype; `model` repeats the device's
arithmetic in the same dtype, `float32` rounds less (neither is bit-identical to the device: cpu and auto modes are
approximate).
"""
from __future__ import annotations

import psutil
import torch

from finemoe.errors import ConfigError
from finemoe.experts.host_store import HostExpertStore

CPU_DTYPES = ("auto", "model", "float32")
HOST_MEMORY_SHARE = 0.8      # float32 copies may take at most this share of the host's available memory


def check_cpu_dtype(name: str) -> str:
    if name not in CPU_DTYPES:
        raise ConfigError(f"--cpu-expert-dtype {name!r} is not one of {', '.join(CPU_DTYPES)} (auto: the faster of "
                          "the model's dtype and float32, measured at start)")
    return name


def copy_bytes(store: HostExpertStore, dtype: torch.dtype) -> int:
    """Host bytes of a copy of every expert in `dtype`."""
    return sum(t.numel() for layer in store.tensors for t in layer.values()) * dtype.itemsize


def fits(nbytes: int) -> bool:
    """Whether `nbytes` more host memory fit in HOST_MEMORY_SHARE of the host's available memory."""
    return nbytes <= HOST_MEMORY_SHARE * psutil.virtual_memory().available


def float32_fits(store: HostExpertStore) -> bool:
    """Whether an fp32 copy of every expert fits in host memory (`fits`)."""
    return fits(copy_bytes(store, torch.float32))


def host_weights(store: HostExpertStore, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Per layer, the expert tensors [J, ...] in `dtype`: the store's own tensors when they already are, else a
    copy (made here, once per call; several seconds for a full-size model)."""
    if all(t.dtype == dtype for layer in store.tensors for t in layer.values()):
        return store.tensors
    return [{name: t.to(dtype) for name, t in layer.items()} for layer in store.tensors]

"""Where a layer's demand misses run: copied to the device and computed there, or computed on the host CPU from
the pinned host copy (`--miss-compute gpu|cpu|auto`).

Both halves run at once (the copy engine and the CPU threads), so a layer's misses finish when the slower half
does. `auto` chooses, per layer, the split that minimises that finish time under a cost model calibrated on this
machine (experts/calibration.py):

    copy half  = queued_s + (misses copied) * copy_s                                        (0 with none copied)
    CPU half   = cpu_fixed_s + sum over CPU misses of (cpu_s + cpu_token_s * (tokens - 1))      (0 with none)

queued_s is the copy work already queued on the copy engine ahead of the layer's demand copies (a demand copy is
issued behind the prefetch copies in flight; Transport.queued_seconds predicts it): the more of it, the more a miss
gains from the CPU, and a layer whose misses all go to the CPU does not wait for it at all.

A miss's CPU cost grows with its tokens and its copy cost does not, so for any number m of CPU misses the best
choice is the m with the fewest tokens; `split_misses` tries every m and keeps the smallest best one (ties go
to the device, which is exact). Experts with many tokens (prefill, large batches) therefore stay on the device.
`gpu` sends none to the CPU (exact, the default); `cpu` sends every miss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finemoe.errors import ConfigError
from finemoe.jit import njit

MODES = ("gpu", "cpu", "auto")
GPU, CPU, AUTO = 0, 1, 2


def mode_code(mode: str) -> int:
    """`--miss-compute` value -> GPU | CPU | AUTO; a clear error for anything else."""
    if mode not in MODES:
        raise ConfigError(f"--miss-compute {mode!r} is not a mode: use one of {', '.join(MODES)} "
                          "(gpu: copy every miss, exact; cpu: compute every miss on the CPU; auto: split by cost)")
    return MODES.index(mode)


@dataclass(frozen=True)
class MissCosts:
    """Seconds to serve one missed expert each way, measured on this machine (or given to the simulator).

    copy_s       one expert host -> device
    cpu_s        one expert computed on the CPU for one token
    cpu_token_s  each further token of the same expert on the CPU
    cpu_fixed_s  once per layer with any CPU miss: hidden states to the host and the result back
    """

    copy_s: float
    cpu_s: float
    cpu_token_s: float = 0.0
    cpu_fixed_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("copy_s", "cpu_s", "cpu_token_s", "cpu_fixed_s"):
            value = getattr(self, name)
            if not (value >= 0.0 and np.isfinite(value)):
                raise ConfigError(f"miss cost {name}={value!r} must be a finite number of seconds >= 0")

    def cpu_time(self, tokens: np.ndarray) -> float:
        """Seconds for the CPU to compute experts with `tokens` [m] tokens each (0 for none)."""
        return cpu_seconds(tokens.astype(np.int64, copy=False), self.cpu_s, self.cpu_token_s, self.cpu_fixed_s)


@njit
def cpu_seconds(tokens, cpu_s, cpu_token_s, cpu_fixed_s):
    """tokens [m] int64 per expert computed on the CPU -> seconds for the layer's CPU half (0.0 for none), summed
    in expert order as `split_misses` sums it."""
    if tokens.size == 0:
        return 0.0
    cpu = cpu_fixed_s
    for i in range(tokens.size):
        cpu += cpu_s + cpu_token_s * (tokens[i] - 1)
    return cpu


@njit
def split_misses(tokens, mode, copy_s, cpu_s, cpu_token_s, cpu_fixed_s, queued_s, on_cpu):
    """tokens [n] int64: tokens routed to each missed expert; queued_s: copy work queued ahead of the demand
    copies (s). Writes on_cpu [n] bool (True: computed on the CPU) and returns the predicted finish time of the
    layer's misses (seconds, both halves at once)."""
    n = tokens.size
    on_cpu[:] = mode == CPU
    if n == 0:
        return 0.0
    if mode == GPU:
        return queued_s + n * copy_s
    if mode == CPU:
        return cpu_seconds(tokens, cpu_s, cpu_token_s, cpu_fixed_s)
    order = np.argsort(tokens, kind="mergesort")        # fewest tokens first (stable: ties keep expert order)
    best_m, best = 0, queued_s + n * copy_s
    cpu = cpu_fixed_s
    for m in range(1, n + 1):
        cpu += cpu_s + cpu_token_s * (tokens[order[m - 1]] - 1)
        finish = max(cpu, queued_s + (n - m) * copy_s) if m < n else cpu
        if finish < best:
            best_m, best = m, finish
    for i in range(best_m):
        on_cpu[order[i]] = True
    return best


def split(tokens: np.ndarray, mode: int, costs: MissCosts, queued_s: float = 0.0) -> np.ndarray:
    """tokens [n] int64 per missed expert -> on_cpu [n] bool (see `split_misses`)."""
    on_cpu = np.empty(tokens.size, dtype=np.bool_)
    split_misses(tokens, mode, costs.copy_s, costs.cpu_s, costs.cpu_token_s, costs.cpu_fixed_s, float(queued_s),
                 on_cpu)
    return on_cpu

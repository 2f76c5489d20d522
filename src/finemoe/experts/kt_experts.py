"""kTransformers' kt-kernel as the CPU half's expert kernel (`--cpu-kernel kt-kernel`, or `auto` when it wins).

kt-kernel (PyPI `kt-kernel`, Apache-2.0) ships one C++ extension per x86 ISA level (AMX, AVX-512 BF16, ..., AVX2;
it loads the best this CPU has) with its own worker pool. Used here through its extension module, the layer the
package's own KTMoEWrapper drives (`kt_kernel.kt_kernel_ext`; no safetensors files, weights handed over in memory):
  - a CPUInfer worker pool of `threads` threads (one NUMA subpool: kt splits an MoE's intermediate size across
    subpools, one per NUMA node, which we do not use), created once per kernel;
  - per MoE layer one BF16 MoE operator (AMXBF16_MOE: AMX or AVX-512 BF16 tiles; AVX2BF16_MOE on AVX2-only
    CPUs), configured for J experts, top-1 and at most MAX_ROWS rows per call. Loading packs the layer's
    gate [J, I, H], up [J, I, H] and down [J, H, I] bf16 weights into kt's tiled layout: kt's copy of every expert
    (the experts' bf16 bytes once more), made from one layer's temporary contiguous bf16 tensors at a time;
  - `compute` hands each CPU row to the operator as a one-expert token (expert id, fp32 weight, bf16 input) and
    gets the weighted bf16 output, MAX_ROWS rows per call. The call is synchronous: kt's pool computes while the
    calling thread waits (kt also has submit/sync tasks, for overlapping with a CUDA stream; the CPU half already
    runs beside the device's copies; on a busy 2-core VM they measured slower than the direct call).
Cores: kt pins each worker thread to one core (hwloc). The calling thread waits for them busily; when it sits on a
worker's core, that worker runs only once the caller's time slice ends, so each call can take up to a scheduler tick
(milliseconds) longer than the work it waits for. So while it waits, the calling thread is kept to the
process's other cores (`_off_worker_cores`, read from the workers' affinity in /proc at start), when there are
any: leave at least one core to the rest of the process (`--cpu-threads` below the core count).
Numerics: bf16 weights and inputs, the gate/up outputs rounded to bf16 before the activation, bf16 results: about
bf16 precision against torch in fp32 (tests/test_cpu_kernel.py states the tolerance). Requirements checked before
any native call (a bad shape crashes the extension): SwiGLU experts (`act_fn` computes SiLU) stored as `gate_up_proj`
[J, 2I, H] and `down_proj` [J, H, I], H and I multiples of 32.

kt's C++ side prints to the process's stdout while it builds or frees its pool and operators; those lines go to
stderr instead (`_stdout_to_stderr`), so `--json` output stays clean.
"""
from __future__ import annotations

import contextlib
import glob
import os
import sys
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from finemoe.errors import ConfigError

ALIGN = 32          # kt's BF16 tiles: H and I must be multiples of this
MAX_ROWS = 128      # rows per native call (kt sizes its scratch buffers by it)
INSTALL = ("install it with `pip install --no-deps kt-kernel gguf` (--no-deps: kt-kernel pins another torch), or on a "
           "machine without the package index put benchmarks/prepare_kt_kernel.py's folder on PYTHONPATH")


def load_extension():
    """kt-kernel's extension module, or a one-line ConfigError saying why not and how to install it."""
    try:
        with _stdout_to_stderr():
            import kt_kernel
    except Exception as e:   # ImportError, or the package's own CPU-variant errors
        raise ConfigError(f"--cpu-kernel kt-kernel: kt-kernel does not import here ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); {INSTALL}") from None
    ext = kt_kernel.kt_kernel_ext
    if _moe_class(ext) is None:
        raise ConfigError(f"--cpu-kernel kt-kernel: kt-kernel's {kt_kernel.__cpu_variant__} build has no BF16 MoE "
                          "kernel (it needs AMX, AVX-512 BF16 or AVX2): use --cpu-kernel torch")
    return ext


def _moe_class(ext):
    return getattr(ext.moe, "AMXBF16_MOE", None) or getattr(ext.moe, "AVX2BF16_MOE", None)


def layout_problem(experts: nn.Module, weights: dict[str, torch.Tensor]) -> str | None:
    """Why kt-kernel cannot compute these experts (weights[name] [J, ...], one layer's), or None if it can."""
    if set(weights) != {"gate_up_proj", "down_proj"}:
        return f"its experts hold {', '.join(sorted(weights))}, not gate_up_proj and down_proj alone"
    J, two_i, H = weights["gate_up_proj"].shape
    if two_i % 2 or tuple(weights["down_proj"].shape) != (J, H, two_i // 2):
        return (f"gate_up_proj {tuple(weights['gate_up_proj'].shape)} and down_proj "
                f"{tuple(weights['down_proj'].shape)} are not [J, 2I, H] and [J, H, I]")
    act = getattr(experts, "act_fn", None)
    probe = torch.linspace(-6.0, 6.0, 97)
    if not callable(act) or not torch.allclose(act(probe), F.silu(probe)):
        return f"its activation is {type(act).__name__}, not SiLU"
    if H % ALIGN or (two_i // 2) % ALIGN:
        return f"hidden size {H} and expert intermediate size {two_i // 2} must be multiples of {ALIGN}"
    return None


class KtLayer(NamedTuple):
    """One layer's kt objects: the operator, and the tensors whose addresses it keeps (they must outlive it)."""

    op: object                 # AMXBF16_MOE or AVX2BF16_MOE
    on_device: torch.Tensor    # bool [J]: experts kt skips (none)
    identity: torch.Tensor     # int64 [J]: kt's physical -> logical expert map


class KtKernel:
    """kt-kernel's BF16 MoE over every given layer (see the module docstring)."""

    out_dtype = torch.bfloat16

    def __init__(self, experts: nn.Module, weights: list[dict[str, torch.Tensor]], threads: int) -> None:
        """experts: one experts module (checked for the layout); weights[l][name] [J, ...] host, per layer; threads:
        kt's worker pool size. Raises ConfigError when kt-kernel is missing or cannot run these experts."""
        problem = layout_problem(experts, weights[0])
        if problem is not None:
            raise ConfigError(f"--cpu-kernel kt-kernel cannot compute this model's experts: {problem}; "
                              "use --cpu-kernel torch")
        ext = load_extension()
        self.threads = threads
        self.name = "kt-kernel-bf16"
        J, two_i, self.hidden = weights[0]["gate_up_proj"].shape
        inter = two_i // 2
        # The only references to kt's objects (freed quietly when this kernel goes, or at exit): "pool", and per
        # layer in "ops" its KtLayer.
        self._native: dict = {}
        with _stdout_to_stderr():
            pool_cfg = ext.WorkerPoolConfig()
            pool_cfg.subpool_count, pool_cfg.subpool_numa_map, pool_cfg.subpool_thread_count = 1, [0], [threads]
            self._native["pool"] = ext.CPUInfer(pool_cfg)
            self._native["ops"] = [self._load(ext, i, layer, J, inter) for i, layer in enumerate(weights)]
        weakref.finalize(self, _free_quietly, self._native)
        self.caller_cores = _caller_cores()

    def _load(self, ext, index: int, layer: dict[str, torch.Tensor], J: int, inter: int) -> KtLayer:
        """One layer's operator, its weights packed from temporary contiguous bf16 gate, up and down tensors."""
        gate_up = layer["gate_up_proj"]                                              # [J, 2I, H]
        gate = gate_up[:, :inter].to(torch.bfloat16).contiguous()                   # [J, I, H]
        up = gate_up[:, inter:].to(torch.bfloat16).contiguous()                     # [J, I, H]
        down = layer["down_proj"].to(torch.bfloat16).contiguous()                   # [J, H, I]
        on_device = torch.zeros(J, dtype=torch.bool)       # kt skips experts marked here: none
        identity = torch.arange(J, dtype=torch.int64)      # kt's physical -> logical expert map
        cfg = ext.moe.MOEConfig(J, 1, self.hidden, inter, on_device.data_ptr())
        pool = self._native["pool"]
        cfg.layer_idx, cfg.pool, cfg.max_len = index, pool.backend_, MAX_ROWS
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = gate.data_ptr(), up.data_ptr(), down.data_ptr()
        op = _moe_class(ext)(cfg)
        pool.submit(op.load_weights_task(identity.data_ptr()))
        pool.sync()
        return KtLayer(op, on_device, identity)

    def compute(self, layer: int, x: torch.Tensor, row_expert: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [R, H], row_expert [R, 1], w [R, 1] host -> [R, H] bf16 weighted rows (the CPUs compute; this thread
        waits)."""
        x = x.to(torch.bfloat16).contiguous()                                       # [R, H]
        ids = row_expert.to(torch.int64).contiguous()                               # [R, 1]
        w = w.to(torch.float32).contiguous()                                        # [R, 1]
        out = torch.empty_like(x)                                                   # [R, H]
        op, rows = self._native["ops"][layer].op, torch.empty(1, dtype=torch.int32)
        with _off_worker_cores(self.caller_cores):
            for start in range(0, x.shape[0], MAX_ROWS):
                rows[0] = min(MAX_ROWS, x.shape[0] - start)
                op.forward(rows.data_ptr(), 1, ids[start].data_ptr(), w[start].data_ptr(), x[start].data_ptr(),
                           out[start].data_ptr(), False)
        return out


def _caller_cores() -> set[int] | None:
    """The cores this process may use that no kt worker is pinned to (kt names its workers numa_*; Linux /proc), or
    None when there are none or it cannot tell."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed, pinned = os.sched_getaffinity(0), set()
    for status in glob.glob("/proc/self/task/*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in open(status).read().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("Name", "").strip().startswith("numa_"):
            pinned |= _cpu_list(fields.get("Cpus_allowed_list", ""))
    free = allowed - pinned
    return free if pinned and free else None


def _cpu_list(text: str) -> set[int]:
    """'0-3,8' -> {0, 1, 2, 3, 8}."""
    cores = set()
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        cores |= set(range(int(lo), int(hi or lo) + 1))
    return cores


@contextlib.contextmanager
def _off_worker_cores(cores: set[int] | None) -> Iterator[None]:
    """The calling thread runs on `cores` inside the block (unchanged when None)."""
    if cores is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _free_quietly(native: dict) -> None:
    with _stdout_to_stderr():
        native.pop("ops", None)       # the operators before their pool
        native.clear()


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 points at stderr inside the block (C++ printf included)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)

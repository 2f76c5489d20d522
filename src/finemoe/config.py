"""One validated configuration that flows from the CLI (or server) to the engine."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from finemoe.errors import BudgetTooSmallError, ConfigError
from finemoe.experts.miss_split import mode_code
from finemoe.experts.cpu_kernel import check_cpu_kernel
from finemoe.experts.cpu_weights import check_cpu_dtype
from finemoe.experts.placement import MODES as PLACEMENT_MODES
from finemoe.experts.prefetch_issue import DEFAULT_CHUNK_BYTES, PrefetchIssue

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*$")


def parse_budget(text: str | int | float | None, total_expert_bytes: int) -> int:
    """Turn '6GiB', '1.5GB', '25%', '0.25' (fraction) or a byte count into bytes.

    None means 100% (every expert fits). Fractions in (0, 1] and percentages are
    relative to `total_expert_bytes`; anything else is an absolute byte count.
    """
    if text is None:
        return total_expert_bytes
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _BUDGET_RE.match(str(text))
        if not m:
            raise ConfigError(
                f"expert budget {text!r} is not understood: use bytes with a unit (e.g. 6GiB, 512MB), "
                "a percentage of all expert bytes (e.g. 25%), or a fraction (e.g. 0.25)")
        value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if not 0 < value <= 100:
            raise ConfigError(f"expert budget {text!r}: a percentage must be in (0, 100]")
        return int(total_expert_bytes * value / 100.0)
    if unit == "" and 0 < value <= 1.0:
        return int(total_expert_bytes * value)
    if unit not in _UNITS:
        raise ConfigError(f"expert budget {text!r}: unknown unit {unit!r}; use one of B, KB, MB, GB, KiB, MiB, GiB, %")
    if value <= 0:
        raise ConfigError(f"expert budget {text!r} must be positive")
    return int(value * _UNITS[unit])


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_devices(text: str | list[str] | tuple[str, ...], device: str) -> tuple[str, ...]:
    """`--devices cuda:0,cuda:1` (or one device, e.g. cpu) as a tuple of device names, checked: each is cpu or
    cuda:N of a visible GPU, none repeats, cpu stands alone, and `device` (--device) agrees with the first (a
    device without an index agrees with any index of its type). One-line ConfigError otherwise."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    if not items or any(not t for t in items):
        raise ConfigError(f"--devices {text!r} has an empty entry: list devices separated by commas, "
                          "e.g. cuda:0,cuda:1")
    for t in items:
        m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", t)
        if not m:
            raise ConfigError(f"--devices: device {t!r} is not supported: use cpu, or cuda:N entries (cuda:0,cuda:1)")
        if m.group(1) == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"--devices: {t!r} was requested but no CUDA GPU is visible: pass --devices cpu")
            if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
                raise ConfigError(f"--devices: {t!r} is not available: {torch.cuda.device_count()} GPU(s) are "
                                  f"visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if len(items) > 1 and ("cpu" in items or "cuda" in items):
        raise ConfigError(f"--devices {','.join(items)}: several devices must all be GPUs with an index "
                          "(cuda:0,cuda:1); cpu runs alone")
    if len(set(items)) < len(items):
        raise ConfigError(f"--devices {','.join(items)} names a device twice: list each GPU once")
    first, dev = torch.device(items[0]), torch.device(device)
    if dev.type != first.type or (dev.index is not None and dev.index != first.index):
        raise ConfigError(f"--device {device} and --devices {','.join(items)} disagree: pass only --devices (its "
                          "first device runs the model's non-expert weights)")
    return tuple(items)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


NON_EXPERT_PLACEMENTS = ("auto", *PLACEMENT_MODES)   # experts/placement.py's modes, or auto: the faster one
EXPERT_TRANSFERS = ("plain", "packed")


def check_packed_miss_compute(miss_compute: str) -> None:
    """--expert-transfer packed holds no plain host copy for a CPU half to read: only --miss-compute gpu."""
    if miss_compute != "gpu":
        raise ConfigError(f"--expert-transfer packed computes every miss on the device (--miss-compute gpu); "
                          f"--miss-compute {miss_compute} reads plain host weights: use --expert-transfer plain")


DEFAULT_STEP_TOKENS = 2048   # max_num_batched_tokens when not given (at least max_batch_size)


@dataclass
class EngineConfig:
    """Everything the engine needs; validated once in `__post_init__`.

    model: hub id or local directory; None runs the built-in seeded random Qwen2-MoE.
    expert_budget: device bytes for routed experts ('6GiB', '25%', 0.25, bytes), or 'auto': what is free on the
        device after the non-expert weights, the KV cache, CUDA graphs and a margin (engine/memory_fit.py).
        None = auto where there is a device figure (CUDA, or device_free_bytes given), else all experts.
        On CUDA an explicit budget that does not fit is refused with the numbers (every device's, several
        --devices: auto gives each device the slots its own memory leaves).
    device_free_bytes: the free device memory auto sizes from (tests inject it): one figure for every device, or a
        tuple with one per --devices entry; None = measured on CUDA.
    devices: several GPUs of one host ('cuda:0,cuda:1', or a tuple): the expert cache's slots are spread over all
        of them (experts/placement.py), each layer computes where `non_expert_placement` puts it, and an expert
        resident on another GPU reaches it by a peer copy (experts/multi_device.py). One device ('cpu') is the same
        as `device`. None: `device` alone. The budget is per device.
    non_expert_placement: with several devices, where the decoder layers' non-expert weights and compute go
        (experts/placement.py `layer_devices`): primary (all on the first), split (contiguous layer ranges over the
        devices, engine/layer_split.py; decodes eagerly), or auto (the faster of the two over a few decode steps
        timed at start, engine/placement_choice.py; primary on one device).
    policy: registered policy name (see `finemoe.policies.available()`).
    prefetch_inflight: how many prefetch copies may be queued on the copy stream at once;
        a demand miss waits behind at most this many (prefetch_issue inflight).
    prefetch_issue, copy_chunk_bytes: how prefetch copies are issued (experts/prefetch_issue.py): inflight (whole
        copies, up to prefetch_inflight at once; the default) or idle (chunks of copy_chunk_bytes issued only into
        the copy engine's predicted idle time, no victim the policy values more than the prefetched expert).
    fast_path: decode with a static KV cache and explicit masks (engine/static_kv.py); models it cannot
        serve (sliding-window layers) fall back to transformers' dynamic cache on their own.
    cuda_graphs: on CUDA, replay fast-path decode steps as captured CUDA graphs.
    compile: on CUDA, `torch.compile` the model's small elementwise-heavy modules (RMSNorm, rotary
        embedding, dense/shared-expert MLPs) to fuse their kernels; see models/compile.py.
    prefill_lookahead: during prefill, while layer l computes, copy the experts layer l+1's router picks for
        layer l's hidden states (runtime._look_ahead): TTFT closer to the copy floor, at the price of
        copies for wrong guesses. Keep it off under routing replay: its guesses come from the model's own router.
    miss_compute: where a layer's demand misses run (experts/miss_split.py): gpu copies every miss (exact, the
        default); cpu computes every miss on the host CPU from the host copy; auto splits each layer's misses
        by a cost model calibrated at start (experts/calibration.py). cpu and auto are approximate (CPU math).
    max_model_len: tokens (prompt + generated) per request; None = the model's max_position_embeddings
        (Engine.max_model_len holds the resolved limit).
    max_num_batched_tokens: continuous batching's token budget per step (engine/continuous.py): every running
        request's decode token counts first, prompt chunks of prefilling requests fill the rest. None: 2048, or
        max_batch_size when that is larger (`step_tokens` holds the resolved budget).
    cpu_threads: torch CPU threads (set process-wide at engine start, used by CPU-computed experts);
        None keeps torch's current number.
    cpu_expert_dtype: the weights CPU-computed experts read (experts/cpu_weights.py): auto (the faster of the
        model's dtype and a float32 copy, measured at start), model, or float32.
    cpu_kernel: what computes CPU-computed experts (experts/cpu_kernel.py): torch (the model's eager experts
        function, the default), kt-kernel (kTransformers' BF16 MoE kernel, if installed) or auto (the faster at
        start).
    expert_transfer: how experts reach the device (experts/packed_transport.py): plain (their bytes as stored, the
        default) or packed (bf16 experts held packed in host memory, 12 bits per weight, copied packed and unpacked on
        the device bit for bit: 3/4 of the bytes per copy and of the host memory; one device, --miss-compute gpu).
    warm_up: before the configured policy is built, run one short request under a stand-in policy, so one-time
        first-use costs stay out of every request's TTFT (engine/warmup.py; `Engine.warm_up_s` reports them).
    """

    model: str | None = None
    device: str = field(default_factory=default_device)
    devices: str | tuple[str, ...] | None = None
    dtype: str = "auto"
    expert_budget: str | int | float | None = None
    device_free_bytes: int | tuple[int, ...] | None = None
    policy: str = "lru"
    policy_options: dict[str, Any] = field(default_factory=dict)
    max_batch_size: int = 8
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    prefetch_inflight: int = 4
    prefetch_issue: str = "inflight"
    copy_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    fast_path: bool = True
    cuda_graphs: bool = True
    compile: bool = False
    prefill_lookahead: bool = False
    miss_compute: str = "gpu"
    cpu_threads: int | None = None
    cpu_expert_dtype: str = "auto"
    non_expert_placement: str = "auto"
    cpu_kernel: str = "torch"
    expert_transfer: str = "plain"
    seed: int = 0
    show_progress: bool = True
    warm_up: bool = False

    @property
    def step_tokens(self) -> int:
        """Continuous batching's token budget per step (max_num_batched_tokens resolved)."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return max(DEFAULT_STEP_TOKENS, self.max_batch_size)

    @property
    def issue(self) -> PrefetchIssue:
        return PrefetchIssue(self.prefetch_issue, self.copy_chunk_bytes)

    def __post_init__(self) -> None:
        if self.devices is not None:
            self.devices = parse_devices(self.devices, str(self.device))
            self.device = self.devices[0]
            if len(self.devices) > 1 and self.prefetch_issue == "idle":
                raise ConfigError("--prefetch-issue idle is not available with several --devices: use the default "
                                  "--prefetch-issue inflight")
        self._check_non_expert_placement()
        dev = str(self.device)
        if dev.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"device {dev!r} is not supported: use 'cuda' or 'cpu'")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was requested but no CUDA GPU is visible: pass --device cpu")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported: use auto, {', '.join(sorted(_DTYPES))}")
        if self.max_batch_size < 1:
            raise ConfigError("max_batch_size must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("max_model_len must be >= 2")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_batch_size:
            raise ConfigError(f"--max-num-batched-tokens {self.max_num_batched_tokens} is below --max-batch-size "
                              f"{self.max_batch_size}: every running request decodes a token each step; raise it "
                              f"to at least {self.max_batch_size}")
        if self.prefetch_inflight < 1:
            raise ConfigError("prefetch_inflight must be >= 1")
        _ = self.issue     # validates both
        mode_code(self.miss_compute)
        if self.cpu_threads is not None and (isinstance(self.cpu_threads, bool) or not isinstance(self.cpu_threads, int)
                                             or self.cpu_threads < 1):
            raise ConfigError(f"--cpu-threads {self.cpu_threads!r} must be a whole number >= 1")
        self._check_expert_transfer()
        check_cpu_dtype(self.cpu_expert_dtype)
        check_cpu_kernel(self.cpu_kernel)
        if self.expert_budget is not None and str(self.expert_budget).strip().lower() != "auto":
            parse_budget(self.expert_budget, 1 << 40)  # syntax check now, size check once the model is known
        self._check_free_bytes()
        from finemoe.policies import check_option_names, get_policy_class  # late: policies import config types
        get_policy_class(self.policy)
        check_option_names(self.policy, self.policy_options)

    def _check_expert_transfer(self) -> None:
        if self.expert_transfer not in EXPERT_TRANSFERS:
            raise ConfigError(f"--expert-transfer {self.expert_transfer!r} is not known: use one of "
                              f"{', '.join(EXPERT_TRANSFERS)}")
        if self.expert_transfer == "packed":
            check_packed_miss_compute(self.miss_compute)
            if len(self.devices or ()) > 1:
                raise ConfigError("--expert-transfer packed works on one device: drop --devices or use "
                                  "--expert-transfer plain")

    def _check_non_expert_placement(self) -> None:
        if self.non_expert_placement not in NON_EXPERT_PLACEMENTS:
            raise ConfigError(f"--non-expert-placement {self.non_expert_placement!r} is not known: use one of "
                              f"{', '.join(NON_EXPERT_PLACEMENTS)}")
        if self.non_expert_placement == "split" and len(self.devices or ()) < 2:
            raise ConfigError("--non-expert-placement split needs several --devices (e.g. --devices cuda:0,cuda:1): "
                              "with one device pass primary or auto")

    @property
    def placement_modes(self) -> tuple[str, ...]:
        """The non-expert placements this configuration may run: auto's two candidates on several devices, else
        the one given (primary on one device)."""
        if len(self.devices or ()) < 2:
            return ("primary",)
        return ("primary", "split") if self.non_expert_placement == "auto" else (self.non_expert_placement,)

    def _check_free_bytes(self) -> None:
        """device_free_bytes: None, one whole number of bytes >= 0 (every device), or one per device."""
        given = self.device_free_bytes
        if given is None:
            return
        figures = list(given) if isinstance(given, (list, tuple)) else [given]
        if any(isinstance(f, bool) or not isinstance(f, int) or f < 0 for f in figures) or not figures:
            raise ConfigError(f"device_free_bytes {given!r} must be a whole number of bytes >= 0, or one per device")
        count = len(self.devices or (self.device,))
        if isinstance(given, (list, tuple)):
            if len(figures) != count:
                raise ConfigError(f"device_free_bytes {given!r} gives {len(figures)} figures for {count} device(s): "
                                  "give one per --devices entry, or one number for all")
            self.device_free_bytes = tuple(figures)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        """'auto': bf16 on CUDA; on CPU float32 (CPU bf16 matmuls are slow and not what tests compare)."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def capacity_for(cfg: EngineConfig, geometry: Any, keeps_all_resident: bool) -> tuple[int, int]:
    """(slots, budget bytes) for this config, per device (several --devices: experts/placement.py spreads them);
    a clear error when the budget cannot work."""
    total = geometry.total_bytes
    budget = parse_budget(cfg.expert_budget, total)
    if keeps_all_resident and len(cfg.devices or ()) > 1:
        raise ConfigError(f"policy {cfg.policy!r} keeps every expert on one device: run it with --device, not "
                          "several --devices")
    if keeps_all_resident:
        if budget < total:
            raise ConfigError(f"policy {cfg.policy!r} keeps every expert on the device and needs the whole "
                              f"{fmt_bytes(total)} ({total} bytes); drop --expert-budget or pass 100%")
        return geometry.total_experts, total
    slots = min(budget // geometry.expert_bytes, geometry.total_experts)
    if slots < geometry.top_k:
        need = geometry.min_budget_bytes
        raise BudgetTooSmallError(
            f"expert budget {fmt_bytes(budget)} ({budget} bytes) holds {slots} experts, but one layer's top-k "
            f"needs {geometry.top_k} experts of {geometry.expert_bytes} bytes: pass --expert-budget {need} "
            f"({fmt_bytes(need)}) or more")
    return int(slots), int(budget)

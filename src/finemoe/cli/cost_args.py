"""The simulator's cost flags (`simulate`, `tune`, `bench --simulate`) and the one place they become a CostModel.

A missed expert computed on the host CPU (`--miss-compute cpu|auto`) costs, for a layer whose CPU half holds
experts with t_1..t_m tokens:

    cpu_layer_ms + sum over i of (cpu_expert_ms + cpu_token_ms * (t_i - 1))

on the host thread from the layer's routing, beside the device half's copies (expert_bytes / bandwidth each); the
layer computes when both are done, as the engine's captured decode path runs it (simulator/timed_kernels.py cpu_half).
"""
from __future__ import annotations

import argparse
import math

from finemoe.errors import ConfigError

MAX_GBPS = 1e5   # 100 TB/s: a larger --bandwidth is a value in B/s passed as GB/s
CPU_COST_HELP = ("the CPU half of a layer with CPU-computed misses of t_1..t_m tokens takes cpu-layer-ms + "
                 "sum_i (cpu-expert-ms + cpu-token-ms * (t_i - 1)), beside the device half's copies; the engine's "
                 "calibration prints these values at start (`finemoe generate --miss-compute auto`: "
                 "'CPU X ms/expert + Y ms/extra token, Z ms/layer round trip')")


def add_cost_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The copy, compute and host costs; `prefix` starts each help."""
    p.add_argument("--bandwidth", default="25",
                   help=f"{prefix}host-to-device copy bandwidth in GB/s (10^9 B/s), or inf")
    p.add_argument("--layer-time-ms", type=float, default=0.0, help=f"{prefix}compute time of one MoE layer")
    p.add_argument("--host-layer-ms", type=float, default=0.0,
                   help=f"{prefix}host round trip before each offloaded layer's experts (routing sync, cache work)")
    p.add_argument("--policy-layer-ms", type=float, default=0.0,
                   help=f"{prefix}the policy's own host time per layer, spent while the layer computes (the next "
                        "layer starts after the longer of the two)")
    p.add_argument("--policy-iteration-ms", type=float, default=0.0,
                   help=f"{prefix}the policy's own host time once per iteration (its iteration start and end), while "
                        "the device idles between iterations (the engine's summary reports it: "
                        "host_policy_ms_per_iteration)")
    p.add_argument("--expert-bytes", type=int, default=None,
                   help=f"{prefix}cost every expert as this many bytes (default: the recorded model's expert size)")
    add_cpu_cost_args(p, prefix)


def add_cpu_cost_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument("--cpu-expert-ms", default=None, metavar="MS",
                   help=f"{prefix}CPU time of one missed expert for one token (needed with --miss-compute cpu|auto); "
                        + CPU_COST_HELP)
    p.add_argument("--cpu-token-ms", default="0", metavar="MS",
                   help=f"{prefix}CPU time of each further token of the same expert (default 0)")
    p.add_argument("--cpu-layer-ms", default="0", metavar="MS",
                   help=f"{prefix}fixed CPU round trip once per layer with any CPU-computed miss (default 0)")


def bandwidth(text: str) -> float:
    """--bandwidth GB/s (or inf) -> B/s."""
    try:
        gbps = float(text)
    except ValueError:
        raise ConfigError(f"--bandwidth {text!r} is not a number of GB/s (or inf)") from None
    if not gbps > 0:
        raise ConfigError("--bandwidth must be positive")
    if MAX_GBPS <= gbps < float("inf"):
        raise ConfigError(f"--bandwidth {text} GB/s is beyond any host link: the unit is GB/s, not B/s (pass e.g. 48.4 "
                          "for 48.4 GB/s, or inf for free copies)")
    return gbps * 1e9


def milliseconds(text: str | None, flag: str, positive: bool = False) -> float:
    """A flag's milliseconds -> seconds: finite, >= 0 (> 0 with `positive`); one-line errors."""
    try:
        ms = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} {text!r} is not a number of milliseconds") from None
    if not math.isfinite(ms) or ms < 0 or (positive and ms == 0):
        raise ConfigError(f"{flag} {text} must be a finite number of ms {'> 0' if positive else '>= 0'}")
    return ms / 1e3


def cpu_costs(args: argparse.Namespace, modes: list[str]) -> tuple[float, float, float]:
    """(cpu_expert_s, cpu_token_s, cpu_layer_s) of the CPU cost flags; --cpu-expert-ms is needed when any of
    `modes` computes misses on the CPU (0 otherwise when not given)."""
    from finemoe.experts.miss_split import GPU, mode_code   # numba: not for --help

    hybrid = [m for m in modes if mode_code(m) != GPU]
    if args.cpu_expert_ms is None:
        if hybrid:
            raise ConfigError(f"--miss-compute {hybrid[0]} needs --cpu-expert-ms MS, the CPU time of one expert for "
                              "one token (the engine's calibration prints it at start: `finemoe generate "
                              "--miss-compute auto`)")
        expert_s = 0.0
    else:
        expert_s = milliseconds(args.cpu_expert_ms, "--cpu-expert-ms", positive=True)
    return (expert_s, milliseconds(args.cpu_token_ms, "--cpu-token-ms"),
            milliseconds(args.cpu_layer_ms, "--cpu-layer-ms"))


def cost_model(args: argparse.Namespace, expert_bytes: int, modes: list[str]):
    """The simulator's CostModel of the cost flags, experts costed at `expert_bytes` (--expert-bytes overrides)."""
    from finemoe.simulator import CostModel   # numba and torch: not for --help

    cpu_expert_s, cpu_token_s, cpu_layer_s = cpu_costs(args, modes)
    return CostModel(int(args.expert_bytes or expert_bytes), bandwidth(args.bandwidth), args.layer_time_ms / 1e3,
                     args.host_layer_ms / 1e3, args.policy_layer_ms / 1e3, cpu_expert_s, cpu_token_s, cpu_layer_s,
                     args.policy_iteration_ms / 1e3)

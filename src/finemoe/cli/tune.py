"""`finemoe tune`: replay a recorded routing trace over budgets, policies and miss-compute modes in the simulator
and recommend the setting with the lowest predicted TPOT (no model, no GPU)."""
from __future__ import annotations

import argparse
import json
import sys

from finemoe.cli.common import public_policy
from finemoe.cli.cost_args import add_cost_args, cost_model
from finemoe.cli.replay_args import add_replay_args, prefetch_issues, semantic_source
from finemoe.cli.simulate import _split, policy_options
from finemoe.errors import ConfigError

DEFAULT_BUDGETS = "10%,25%,50%"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Replays TRACE through the simulator for every budget x policy x --miss-compute mode x "
                     "--prefetch-issue rule and prints the predicted table and the setting with the lowest TPOT (per "
                     "budget, and overall). Give it this machine's costs: the engine prints them once at start with "
                     "--miss-compute cpu|auto ('copy C ms/expert; CPU X ms/expert + Y ms/extra token, Z ms/layer "
                     "round trip'): pass --cpu-expert-ms X --cpu-token-ms Y --cpu-layer-ms Z, and --bandwidth as "
                     "expert bytes / C.")
    p.add_argument("--trace", required=True,
                   help="trace from `finemoe trace`, or the FLAME-MoE .npz (suffix #seq, #first10 or #all)")
    p.add_argument("--expert-budget", default=DEFAULT_BUDGETS, help="comma-separated budgets")
    p.add_argument("--policy", default=None, metavar="P[,P...]",
                   help="comma-separated policies (default: the routing-only policies the trace can drive, "
                        "oracle left out)")
    p.add_argument("--miss-compute", default=None, metavar="MODES",
                   help="comma-separated modes of gpu,cpu,auto (default: all three with --cpu-expert-ms, else gpu)")
    add_cost_args(p)
    p.add_argument("--policy-option", action="append", default=[], metavar="[POLICY:]KEY=VALUE",
                   help="policy option (JSON value) for every policy, or for one with a POLICY: prefix")
    add_replay_args(p, "comma-separated prefetch issue rules of inflight,idle,off to compare (default inflight)")
    p.add_argument("--json", action="store_true",
                   help='print {"results": [...], "recommended": {"per_budget": {...}, "best": {...}}}')
    p.set_defaults(func=run)


def _modes(args: argparse.Namespace) -> list[str]:
    from finemoe.experts.miss_split import MODES, mode_code   # numba: not for --help

    if args.miss_compute is None:
        return list(MODES) if args.cpu_expert_ms is not None else ["gpu"]
    modes = _split(args.miss_compute, "--miss-compute")
    for m in modes:
        mode_code(m)
    return list(dict.fromkeys(modes))


def run(args: argparse.Namespace) -> int:
    from finemoe.simulator.tuning import default_policies, tune   # numba and torch: not for --help
    from finemoe.traces import load_trace

    trace = load_trace(args.trace)
    budgets = list(dict.fromkeys(_split(args.expert_budget, "--expert-budget")))
    policies = (default_policies(trace) if args.policy is None
                else [public_policy(p) for p in _split(args.policy, "--policy")])
    if not (args.expert_bytes or trace.expert_bytes):
        raise ConfigError(f"trace {args.trace!r} does not say how large an expert is: pass --expert-bytes N")
    issues = prefetch_issues(args)
    modes = _modes(args)
    cost = cost_model(args, trace.expert_bytes, modes)
    options = policy_options(args.policy_option, policies)
    embed = semantic_source(args, trace, options, "tune")
    result = tune(trace, budgets, policies, modes, cost, options, args.prefetch_inflight, embed,
                  optional=args.policy is None, issues=issues)
    for policy, why in result.skipped.items():
        print(f"finemoe: tune: {policy} left out: {why}", file=sys.stderr)
    if args.json:
        json.dump(result.as_json(), sys.stdout)
        print()
    else:
        _print(trace, cost, args, result)
    return 0


def _row(r: dict) -> str:
    return (f"{r['expert_budget']:>8}  {r['policy']:<14}{r['miss_compute']:<6}{r['prefetch_issue']:<10}"
            f"{r['hit_rate']:>9.4f}"
            f"{r['cpu_experts']:>9}{r['bytes_per_token'] / 1e6:>11.3f}{r['ttft_s'] * 1e3:>10.3f}"
            f"{r['tpot_s'] * 1e3:>10.3f}")


def _print(trace, cost, args: argparse.Namespace, result) -> None:
    """The table of `result` (a simulator.tuning.Tuning) and its recommendations."""
    print(f"simulated   trace: {trace.source} ({trace.num_requests} requests, {trace.num_tokens} tokens)   expert "
          f"{cost.expert_bytes} B, copy {cost.copy_s * 1e3:.3f} ms   CPU {cost.cpu_expert_s * 1e3:.3f} ms/expert "
          f"+ {cost.cpu_token_s * 1e3:.3f} ms/extra token, {cost.cpu_layer_s * 1e3:.3f} ms/layer   "
          f"layer {args.layer_time_ms} ms")
    header = (f"{'budget':>8}  {'policy':<14}{'mode':<6}{'prefetch':<10}{'hit rate':>9}{'CPU exp':>9}{'MB/token':>11}"
              f"{'TTFT ms':>10}{'TPOT ms':>10}")
    print(header)
    for r in result.rows:
        print(_row(r))
    print("\nrecommended (lowest predicted TPOT):")
    for r in result.per_budget.values():
        print(_row(r))
    b = result.best
    print(f"best: --expert-budget {b['expert_budget']} --policy {b['policy']} --miss-compute {b['miss_compute']} "
          f"--prefetch-issue {b['prefetch_issue']} (TPOT {b['tpot_s'] * 1e3:.3f} ms predicted)")

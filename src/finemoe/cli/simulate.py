"""`finemoe simulate`: replay a routing trace through policies and a cost model (no model, no GPU)."""
from __future__ import annotations

import argparse
import json
import sys

from finemoe.cli.common import DEFAULT_POLICY, add_miss_compute_arg, parse_policy_options, public_policy
from finemoe.cli.cost_args import add_cost_args, cost_model
from finemoe.cli.replay_args import add_replay_args, prefetch_issues, semantic_source
from finemoe.errors import ConfigError

ROW_KEYS = ("policy", "expert_budget_bytes", "hits", "misses", "hit_rate", "bytes_copied", "bytes_per_token",
            "cpu_experts", "ttft_s", "tpot_s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True,
                   help="trace from `finemoe trace`, or the FLAME-MoE .npz (suffix #seq, #first10 or #all)")
    p.add_argument("--policy", default=DEFAULT_POLICY, metavar="P[,P...]",
                   help="policy or comma-separated policies, e.g. lru,lfu,oracle")
    p.add_argument("--expert-budget", default="25%", help="budget or comma-separated budgets: 25%%,50%%,6GiB")
    add_cost_args(p)
    add_miss_compute_arg(p)
    add_replay_args(p, "how prefetch copies are issued (as `finemoe generate --prefetch-issue`)")
    p.add_argument("--policy-option", action="append", default=[], metavar="[POLICY:]KEY=VALUE",
                   help="policy option (JSON value) for every policy, or for one with a POLICY: prefix")
    p.add_argument("--json", action="store_true", help='print {"results": [...]} (one row per policy and budget)')
    p.set_defaults(func=run)


def _split(text: str, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ConfigError(f"{what} is empty")
    return items


def policy_options(items: list[str], policies: list[str]) -> dict[str, dict]:
    """'KEY=VALUE' applies to every policy, 'POLICY:KEY=VALUE' to that one only."""
    out: dict[str, dict] = {p: {} for p in policies}
    for item in items:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            if head not in out:
                raise ConfigError(f"--policy-option {item!r} names policy {head!r}, which is not simulated")
            out[head].update(parse_policy_options([rest]))
        else:
            for p in policies:
                out[p].update(parse_policy_options([item]))
    return out


def run(args: argparse.Namespace) -> int:
    from finemoe.simulator import simulate   # numba and torch: not for --help
    from finemoe.traces import load_trace

    trace = load_trace(args.trace)
    policies = [public_policy(p) for p in _split(args.policy, "--policy")]
    budgets = _split(args.expert_budget, "--expert-budget")
    if not (args.expert_bytes or trace.expert_bytes):
        raise ConfigError(f"trace {args.trace!r} does not say how large an expert is: pass --expert-bytes N")
    issues = prefetch_issues(args)
    if len(issues) > 1:
        raise ConfigError("simulate takes one --prefetch-issue; `finemoe tune` compares several")
    cost = cost_model(args, trace.expert_bytes, [args.miss_compute])
    options = policy_options(args.policy_option, policies)
    embed = semantic_source(args, trace, options, "simulate")
    rows = simulate(trace, policies, budgets, cost, options, args.prefetch_inflight, args.miss_compute, embed=embed,
                    issue=issues[0])
    if args.json:
        json.dump({"results": rows}, sys.stdout)
        print()
        return 0
    print(f"simulated   trace: {trace.source} ({trace.model}; {trace.num_requests} requests, "
          f"{trace.num_tokens} tokens)   expert {cost.expert_bytes} B   bandwidth {args.bandwidth} GB/s   "
          f"layer {args.layer_time_ms} ms   misses on {args.miss_compute}   (sim req/s: the simulator's own speed, "
          "wall clock, not a prediction)")
    print(f"{'policy':<14}{'budget B':>14}{'hit rate':>10}{'misses':>10}{'CPU exp':>9}{'bytes/token':>14}"
          f"{'TTFT ms':>10}{'TPOT ms':>10}{'sim req/s':>10}")
    for r in rows:
        print(f"{r['policy']:<14}{r['expert_budget_bytes']:>14}{r['hit_rate']:>10.4f}{r['misses']:>10}"
              f"{r['cpu_experts']:>9}{r['bytes_per_token']:>14.0f}{r['ttft_s'] * 1e3:>10.3f}"
              f"{r['tpot_s'] * 1e3:>10.3f}{r['requests_per_s']:>10.1f}")
    return 0

"""`finemoe bench`: build each policy's history from a build split of the prompts, evaluate every policy x
budget x prefetch distance on the held-out split (engine or simulator), write CSV/JSON/PNGs, print a table."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

from tqdm import tqdm

from finemoe.cli.common import positive, add_miss_compute_args, add_template_arg, check_cpu_half_flags
from finemoe.cli.cost_args import add_cost_args, cost_model
from finemoe.cli.preflight import check_out_dir, require_extra
from finemoe.cli.simulate import _split
from finemoe.errors import ConfigError

TEMPLATE = "User: {prompt}\n\nAssistant:"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id or local directory; default: the built-in random model")
    p.add_argument("--prompts", required=True, help="JSONL file(s) with a 'prompt' field, comma-separated")
    p.add_argument("--policies", default="finemoe,lru",
                   help="comma-separated policies; options as POLICY/KEY=VALUE/..., e.g. finemoe/search=trajectory")
    p.add_argument("--expert-budget", default="25%", help="budget or comma-separated budgets: 25%%,50%%,6GiB")
    p.add_argument("--split", type=float, default=0.7, help="fraction of the prompts that builds histories")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of --limit's subsample")
    p.add_argument("--limit", type=positive, default=None, help="at most N prompts per file (seeded subsample)")
    p.add_argument("--max-prompt-tokens", type=int, default=64, help="truncate each templated prompt to N tokens")
    add_template_arg(p, TEMPLATE)
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per request (EOS ignored)")
    p.add_argument("--prefetch-distance", default=None,
                   help="d or comma-separated d values for finemoe (and promoe's stride); default: the policy's")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--engine", dest="simulate", action="store_false", help="evaluate in the engine (default)")
    mode.add_argument("--simulate", dest="simulate", action="store_true",
                      help="record traces with the engine, evaluate routing-driven policies in the simulator")
    add_cost_args(p, prefix="simulator: ")
    p.add_argument("--trace-dir", default=None,
                   help="keep recorded routing traces here and reuse them in later benches over the same prompts")
    p.add_argument("--build-batch", type=int, default=8, help="batch size for building histories and traces")
    p.add_argument("--device", default=None, metavar="cuda|cpu",
                   help="where the model runs (default: cuda when present, else cpu)")
    p.add_argument("--dtype", default="auto", metavar="auto|bf16|fp16|fp32",
                   help="weights' dtype; auto is bf16 on CUDA, fp32 on the CPU")
    add_miss_compute_args(p)
    p.add_argument("--out", default="bench-out", help="folder for requests.csv, summary.json/csv and PNGs")
    p.add_argument("--json", action="store_true", help='print {"results": [...]} instead of the table')
    p.set_defaults(func=run, simulate=False)


def _distances(text: str | None) -> list[int | None]:
    if text is None:
        return [None]
    try:
        out = [int(x) for x in _split(text, "--prefetch-distance")]
    except ValueError:
        raise ConfigError(f"--prefetch-distance {text!r} must be integers, e.g. 1,2,3") from None
    if min(out) < 1:
        raise ConfigError("--prefetch-distance values must be >= 1")
    return out


def _simulated_miss_report(cost) -> dict:
    """The miss costs a simulated bench charged (the engine's report's keys)."""
    return {"cpu_threads": None, "miss_costs": dataclasses.asdict(cost.miss_costs)}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run(args: argparse.Namespace) -> int:
    from finemoe.config import EngineConfig, default_device   # torch: not for --help
    from finemoe.engine import Engine
    from finemoe.eval.report import json_results, setup_line, table, write_outputs
    from finemoe.eval.runner import Bench, BenchPlan
    from finemoe.eval.split import split_indices
    from finemoe.eval.variants import parse_variants
    from finemoe.eval.workload import load_texts, tokenize

    if args.max_new_tokens < 1 or args.build_batch < 1:
        raise ConfigError("--max-new-tokens and --build-batch must be >= 1")
    if args.limit is not None and args.limit < 2:
        raise ConfigError("--limit must be >= 2 (a split needs prompts on both sides)")
    require_extra(["matplotlib"], "plot", "finemoe bench (its PNG plots)")
    check_out_dir(args.out)
    variants = parse_variants(args.policies)
    budgets = _split(args.expert_budget, "--expert-budget")
    if not args.simulate:
        flags = (("--cpu-expert-ms", args.cpu_expert_ms), ("--cpu-token-ms", args.cpu_token_ms),
                 ("--cpu-layer-ms", args.cpu_layer_ms))
        given = [flag for flag, value in flags if value not in (None, "0")]
        if given:
            raise ConfigError(f"{', '.join(given)} cost the simulator's CPU half: pass --simulate, or drop them "
                              "(the engine measures its own costs at start)")
        check_cpu_half_flags(args)
    cost = cost_model(args, 1, [args.miss_compute]) if args.simulate else None
    texts = load_texts(_split(args.prompts, "--prompts"), args.limit, args.seed)
    build_idx, held_idx = split_indices(len(texts), args.split, args.seed)
    # simulate mode records its traces exactly (gpu) and replays them in --miss-compute's mode
    engine = Engine.from_config(EngineConfig(model=args.model, device=args.device or default_device(),
                                             dtype=args.dtype,
                                             show_progress=False, seed=args.seed,
                                             miss_compute="gpu" if cost else args.miss_compute,
                                             cpu_threads=args.cpu_threads,
                                             cpu_expert_dtype=args.cpu_expert_dtype,
                                             cpu_kernel=args.cpu_kernel, warm_up=True))
    print(f"finemoe: warm-up {engine.warm_up_s:.2f} s (one-time, before timing)", file=sys.stderr)
    if cost is not None and args.expert_bytes is None:
        cost = dataclasses.replace(cost, expert_bytes=engine.geometry.expert_bytes)
    prompts = tokenize(engine.tokenizer, texts, args.template, args.max_prompt_tokens)
    engine.check_fits(max(len(p.ids) for p in prompts), args.max_new_tokens)
    plan = BenchPlan(variants, budgets, _distances(args.prefetch_distance), args.max_new_tokens, args.build_batch, cost,
                     trace_dir=args.trace_dir, miss_compute=args.miss_compute)
    with tqdm(total=len(plan.jobs) + (1 if cost else 0), desc="bench", unit="run", file=sys.stderr,
              disable=None) as bar:     # None: shown on a terminal only
        bench = Bench(engine, [prompts[i] for i in build_idx], [prompts[i] for i in held_idx], plan,
                      progress=lambda label: (bar.set_postfix_str(label[:40]), bar.update(1)))
        summary, per_request = bench.run()
    engine.close()
    meta = {"model": engine.model_name, "device": str(engine.device), "prompts": args.prompts, "limit": args.limit,
            "split": args.split, "seed": args.seed, "build_prompts": int(build_idx.size),
            "held_out_prompts": int(held_idx.size), "max_new_tokens": args.max_new_tokens,
            "max_prompt_tokens": args.max_prompt_tokens, "mode": "simulate" if cost else "engine",
            "expert_bytes": cost.expert_bytes if cost else engine.geometry.expert_bytes,
            "bandwidth_GBps": args.bandwidth if cost else None, "layer_time_ms": args.layer_time_ms if cost else None,
            "host_layer_ms": args.host_layer_ms if cost else None,
            "policy_layer_ms": args.policy_layer_ms if cost else None,
            "policy_iteration_ms": args.policy_iteration_ms if cost else None, "commit": _commit(),
            "miss_compute_flag": args.miss_compute, "miss_compute": args.miss_compute, "warm_up_s": engine.warm_up_s,
            **(_simulated_miss_report(cost) if cost else engine.miss_compute_report())}
    write_outputs(args.out, summary, per_request, meta)
    from finemoe.eval.plots import plot_summary   # matplotlib (the plot extra): `finemoe --help` must not need it
    setup = setup_line(meta, budgets)
    plot_summary(summary, args.out, title=f"{os.path.basename(str(engine.model_name))}: {setup}")
    if args.json:
        json.dump(json_results(summary), sys.stdout)
        print()
    else:
        print(f"model {engine.model_name}; {setup} (of {len(texts)} prompts); outputs in {args.out}")
        print(table(summary))
    return 0

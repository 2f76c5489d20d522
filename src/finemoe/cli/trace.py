"""`finemoe trace`: run prompts through the engine and record their routing to a trace file."""
from __future__ import annotations

import argparse

from finemoe.cli.common import (add_engine_args, add_progress_args, add_prompt_shaping_args, engine_config,
                                parse_policy_options, progress_bar, public_policy)
from finemoe.cli.preflight import check_out_file
from finemoe.errors import ConfigError
from finemoe.prompts import read_prompts, templated


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, map_store=False)
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl", help="JSONL file with a 'prompt' field per line")
    p.add_argument("--out", required=True, help="trace file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate per prompt")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
    add_prompt_shaping_args(p)
    p.add_argument("--no-probs", action="store_true", help="omit full router probabilities (top-k ids only)")
    add_progress_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from finemoe.engine import Engine, SamplingParams   # torch: not for --help

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be >= 1")
    check_out_file(args.out, overwrite=args.overwrite)
    records = read_prompts(args.prompts)[:args.limit]
    inner = {"inner": public_policy(args.policy), "inner_options": parse_policy_options(args.policy_option),
             "probs": not args.no_probs}
    engine = Engine.from_config(engine_config(args, policy="record", policy_options=inner,
                                              show_progress=not args.quiet))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.seed, ignore_eos=args.ignore_eos)
    ids = [ids for _, ids in templated(engine.tokenizer, records, args.template, args.max_prompt_tokens)]
    with progress_bar(len(ids), "trace", args.quiet) as bar:
        engine.generate(ids, params, on_batch=bar.update)
    trace = engine.policy.to_trace(engine.model_name, engine.geometry.expert_bytes)
    trace.prompt_texts = [rec["prompt"] for rec in records]   # every request ran (none is cancelled here)
    engine.close()
    trace.save(args.out)
    print(f"wrote {args.out}: {trace.num_requests} requests, {trace.num_tokens} routed tokens, "
          f"{trace.num_layers} layers x {trace.num_experts} experts (top-{trace.top_k}), "
          f"probs {'on' if trace.has_probs else 'off'}")
    return 0

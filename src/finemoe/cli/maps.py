"""`finemoe maps build`: collect a FineMoE expert-map store offline by serving a prompt set."""
from __future__ import annotations

import argparse

from finemoe.cli.common import (add_engine_args, add_progress_args, add_prompt_shaping_args, engine_config,
                                progress_bar)
from finemoe.cli.preflight import check_out_file
from finemoe.errors import ConfigError
from finemoe.prompts import read_prompts, templated


def add_arguments(p: argparse.ArgumentParser) -> None:
    maps_sub = p.add_subparsers(dest="maps_command", required=True, metavar="SUBCOMMAND")
    b = maps_sub.add_parser("build", help="serve prompts and store their FineMoE expert maps",
                            description="Serve prompts with the finemoe policy (every expert resident unless "
                                        "--expert-budget says otherwise) and store their expert maps.",
                            epilog=p.epilog, formatter_class=p.formatter_class)
    add_engine_args(b, policy=False, map_store=False)
    b.add_argument("--prompts", required=True, metavar="FILE.jsonl", help="JSONL file with a 'prompt' field per line")
    b.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate per prompt")
    b.add_argument("--out", required=True, help="map store file to write (written atomically)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    b.add_argument("--capacity", type=int, default=1000, metavar="C", help="map store capacity (maps kept)")
    add_prompt_shaping_args(b)
    add_progress_args(b)
    b.set_defaults(func=build, policy="finemoe")


def build(args: argparse.Namespace) -> int:
    from finemoe.engine import Engine, SamplingParams   # torch: not for --help

    if args.max_new_tokens < 1 or args.capacity < 1:
        raise ConfigError("--max-new-tokens and --capacity must be >= 1")
    check_out_file(args.out, overwrite=args.overwrite)
    records = read_prompts(args.prompts)[:args.limit]
    cfg = engine_config(args, show_progress=not args.quiet)
    cfg.policy_options.update(map_store=args.out, learn=True, fresh=True, capacity=args.capacity)
    engine = Engine.from_config(cfg)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    requests = []
    for text, ids in templated(engine.tokenizer, records, args.template, args.max_prompt_tokens):
        requests.append(engine.make_request(ids, params))
        requests[-1].prompt_text = text        # finemoe's semantic='prompt' embeds the text
    with progress_bar(len(requests), "maps build", args.quiet) as bar:
        engine.run(requests, on_batch=bar.update)
    state = engine.policy.state_dict()
    engine.close()
    print(f"wrote {args.out}: {state['store_size']} expert maps (capacity {state['store_capacity']}, "
          f"{state['store_replaced']} replaced by RDY) from {len(requests)} prompts")
    return 0

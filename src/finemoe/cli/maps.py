"""`finemoe maps build`: collect a FineMoE expert-map store offline by serving a prompt set."""
from __future__ import annotations

import argparse

from finemoe.cli.common import add_engine_args, engine_config
from finemoe.cli.preflight import check_out_file
from finemoe.engine import Engine, SamplingParams
from finemoe.errors import ConfigError
from finemoe.prompts import read_prompts


def add_parser(sub) -> None:
    p = sub.add_parser("maps", help="FineMoE expert-map stores")
    maps_sub = p.add_subparsers(dest="maps_command", required=True)
    b = maps_sub.add_parser("build", help="serve prompts with every expert resident and store their expert maps")
    add_engine_args(b, policy_default="finemoe")
    b.add_argument("--prompts", required=True, help="JSONL file with a 'prompt' field per line")
    b.add_argument("--max-new-tokens", type=int, default=32)
    b.add_argument("--out", required=True, help="map store file to write (written atomically)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    b.add_argument("--capacity", type=int, default=1000, help="map store capacity C (default 1000)")
    b.set_defaults(func=build)


def build(args: argparse.Namespace) -> int:
    if args.policy != "finemoe":
        raise ConfigError("finemoe maps build collects FineMoE maps: drop --policy (or pass --policy finemoe)")
    if args.max_new_tokens < 1 or args.capacity < 1:
        raise ConfigError("--max-new-tokens and --capacity must be >= 1")
    check_out_file(args.out, overwrite=args.overwrite)
    prompts = [r["prompt"] for r in read_prompts(args.prompts)]
    cfg = engine_config(args)
    cfg.policy_options.update(map_store=args.out, learn=True, fresh=True, capacity=args.capacity)
    engine = Engine.from_config(cfg)
    engine.generate(prompts, SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True))
    state = engine.policy.state_dict()
    engine.close()
    print(f"wrote {args.out}: {state['store_size']} expert maps (capacity {state['store_capacity']}, "
          f"{state['store_replaced']} replaced by RDY) from {len(prompts)} prompts")
    return 0

"""`finemoe maps build`: collect a FineMoE expert-map store offline by serving a prompt set."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from finemoe.cli.build_checkpoint import (BuildProgress, check_resumable, checkpoint_path, prompts_digest,
                                          read_progress)
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
    b.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists, and start over if an interrupted build left OUT.partial")
    b.add_argument("--capacity", type=int, default=1000, metavar="C", help="map store capacity (maps kept)")
    b.add_argument("--checkpoint-every", type=int, default=16, metavar="N",
                   help="save the store learned so far to OUT.partial every N prompts (rounded up to whole batches)")
    b.add_argument("--resume", action="store_true",
                   help="continue the interrupted build in OUT.partial (same command), skipping its prompts")
    add_prompt_shaping_args(b)
    add_progress_args(b)
    b.set_defaults(func=build, policy="finemoe")


def _check(args: argparse.Namespace, partial: str) -> None:
    if args.max_new_tokens < 1 or args.capacity < 1 or args.checkpoint_every < 1:
        raise ConfigError("--max-new-tokens, --capacity and --checkpoint-every must be >= 1")
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues OUT.partial and --overwrite starts over: pass one of them")
    check_out_file(args.out, overwrite=args.overwrite)
    if os.path.exists(partial) and not (args.resume or args.overwrite):
        raise ConfigError(f"{partial!r} holds an interrupted build of {args.out!r}: pass --resume to continue it, "
                          "or --overwrite to start over")


def build(args: argparse.Namespace) -> int:
    from finemoe.engine import Engine, SamplingParams   # torch: not for --help

    partial = checkpoint_path(args.out)
    _check(args, partial)
    saved = read_progress(partial) if args.resume else None
    records = read_prompts(args.prompts)[:args.limit]
    cfg = engine_config(args, show_progress=not args.quiet)
    options = dict(cfg.policy_options)
    cfg.policy_options.update(map_store=partial, learn=True, fresh=saved is None, capacity=args.capacity)
    engine = Engine.from_config(cfg)
    shaped = templated(engine.tokenizer, records, args.template, args.max_prompt_tokens)
    prompts = [ids for _, ids in shaped]
    progress = BuildProgress(engine.model_name, args.max_new_tokens, args.capacity, options, 0, prompts_digest([]))
    if saved is not None:
        progress = dataclasses.replace(progress, done=saved.done, digest=saved.digest)
        check_resumable(saved, progress, prompts, partial)
        print(f"finemoe: maps build: resuming {partial}: {saved.done} of {len(prompts)} prompts done", file=sys.stderr)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    requests = []
    for text, ids in shaped[progress.done:]:
        requests.append(engine.make_request(ids, params))
        requests[-1].prompt_text = text        # finemoe's semantic='prompt' embeds the text
    every = -(-args.checkpoint_every // cfg.max_batch_size) * cfg.max_batch_size   # whole batches: same as one run
    with progress_bar(len(prompts), "maps build", args.quiet, initial=progress.done) as bar:
        for start in range(0, len(requests), every):
            try:
                engine.run(requests[start:start + every], on_batch=bar.update)
            except KeyboardInterrupt:
                print(f"\nfinemoe: maps build interrupted: {progress.done} of {len(prompts)} prompts kept in "
                      f"{partial}; repeat the command with --resume to continue", file=sys.stderr)
                raise
            done = progress.done + len(requests[start:start + every])
            progress = dataclasses.replace(progress, done=done, digest=prompts_digest(prompts[:done]))
            engine.policy.store.save(partial, progress.metadata())          # atomic: the store with its progress
    state = engine.policy.state_dict()
    engine.close()                             # the finemoe policy saves its store to `partial` (no progress)
    os.replace(partial, args.out)
    print(f"wrote {args.out}: {state['store_size']} expert maps (capacity {state['store_capacity']}, "
          f"{state['store_replaced']} replaced by RDY) from {len(prompts)} prompts")
    return 0

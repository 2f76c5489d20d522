"""`finemoe generate`: run prompts through the offloading engine and report per-request metrics."""
from __future__ import annotations

import argparse
import json
import sys

from finemoe.cli.common import add_engine_args, add_progress_args, add_template_arg, engine_config, progress_bar
from finemoe.errors import ConfigError
from finemoe.prompts import chat_prompts, fill_template, read_prompts


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="one prompt")
    src.add_argument("--prompts", metavar="FILE.jsonl", help="JSONL file with a 'prompt' field per line")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--chat", action="store_true",
                       help="send each prompt as a user message formatted by the tokenizer's chat template")
    add_template_arg(shape)
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: keep the smallest set of tokens whose probability reaches P")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object (requests + summary)")
    add_progress_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from finemoe.engine import Engine, SamplingParams   # torch: not for --help

    prompts = [args.prompt] if args.prompt is not None else [r["prompt"] for r in read_prompts(args.prompts)]
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be >= 1")
    texts = fill_template(args.template, prompts)
    engine = Engine.from_config(engine_config(args, show_progress=not args.quiet, warm_up=True))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, ignore_eos=args.ignore_eos)
    try:
        if args.chat:
            texts = chat_prompts(engine.tokenizer, prompts)
        with progress_bar(len(prompts), "generate", args.quiet or args.prompt is not None) as bar:
            reqs = engine.generate(texts, params, on_batch=bar.update)
        summary = engine.summary(reqs)
        print(f"finemoe: warm-up {engine.warm_up_s:.2f} s (one-time, before timing: in no request's TTFT)",
              file=sys.stderr)
    finally:
        engine.close()
    rows = [{"prompt": p, "output_token_ids": r.output_ids, "text": r.text, "finish_reason": r.finish_reason,
             **r.metrics.as_dict()} for p, r in zip(prompts, reqs)]
    if args.json:
        json.dump({"requests": rows, "summary": summary}, sys.stdout)
        print()
        return 0
    print(f"model: {engine.model_label}   mode: engine   policy: {summary['policy']}   device: {summary['device']}   "
          f"expert cache: {summary['cache_slots']} slots ({summary['expert_budget_bytes']} bytes)   "
          f"decode: {summary['decode_path']}   requests: {summary['requests']}")
    for row in rows:
        print(f"\n>>> {row['prompt']}\n{row['text']}")
    print(f"\nTTFT {summary['ttft_s'] * 1e3:.1f} ms   TPOT {summary['tpot_s'] * 1e3:.2f} ms   "
          f"hit rate {summary['hit_rate']:.3f} ({summary['hits']} hits, {summary['misses']} misses)   "
          f"copied {summary['bytes_copied'] / 2**20:.1f} MiB   stall {summary['stall_s'] * 1e3:.1f} ms   "
          f"peak host {summary['peak_host_bytes'] / 2**20:.0f} MiB   (medians over {summary['requests']} requests; "
          f"warm-up {summary['warm_up_s']:.2f} s apart)")
    return 0

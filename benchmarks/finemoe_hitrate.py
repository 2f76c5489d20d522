"""FineMoE vs LRU hit rate on a held-out prompt split (docs/FINEMOE.md, "Measured: hit rate on ref-moe" and
"Measured: wasted prefetches").

A prompt set is shuffled with a fixed seed and split: the first `--build` prompts build a map store
(every expert resident, store learned), the next `--eval` prompts are served at `--budget` with each
policy variant. Prompts are wrapped "User: {prompt}\\n\\nAssistant:" with the prompt body truncated so
the whole prompt is at most `--prompt-tokens` tokens; every request generates `--new-tokens` tokens.

    python3 benchmarks/finemoe_hitrate.py --model ../shared/models/ref-moe \\
        --prompts ../shared/data/prompts/arena_hard_v01.jsonl --build 140 --eval 60 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine.request import Request

HEAD, TAIL = "User: ", "\n\nAssistant:"

# name -> (policy, options); finemoe variants name the store they need by (semantic, prefill)
VARIANTS = {
    "lru": ("lru", {}),
    "finemoe": ("finemoe", {}),
    "finemoe-paper": ("finemoe", {"neighbors": 1}),              # the paper: single best map
    "finemoe-semantic-only": ("finemoe", {"search": "semantic"}),
    "finemoe-trajectory-only": ("finemoe", {"search": "trajectory"}),
    "finemoe-prefill-last": ("finemoe", {"prefill": "last"}),
    "finemoe-prompt-encoder": ("finemoe", {"semantic": "prompt"}),
    "finemoe-token+prompt": ("finemoe", {"semantic": "token+prompt"}),
    "finemoe-online": ("finemoe", {"learn": True}),
    "finemoe-floor-0.05": ("finemoe", {"min_prefetch_prob": 0.05}),
    "finemoe-floor-0.02": ("finemoe", {"min_prefetch_prob": 0.02}),
}


def split_prompts(path: str, n_build: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    with open(path, encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    random.Random(seed).shuffle(prompts)
    if n_build + n_eval > len(prompts):
        raise SystemExit(f"{path} has {len(prompts)} prompts, fewer than {n_build} + {n_eval}")
    return prompts[:n_build], prompts[n_build:n_build + n_eval]


def make_requests(engine: Engine, prompts: list[str], prompt_tokens: int, new_tokens: int) -> list[Request]:
    tok = engine.tokenizer
    tail = tok(TAIL, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    reqs = []
    for p in prompts:
        body = tok(HEAD + p, add_special_tokens=False)["input_ids"][: prompt_tokens - len(tail)]
        reqs.append(Request(body + tail, params, tok.decode(body + tail)))
    return reqs


def engine_for(model: str, policy: str, options: dict, budget, batch: int) -> Engine:
    cfg = EngineConfig(model=model, device="cpu", policy=policy, policy_options=options, expert_budget=budget,
                       max_batch_size=batch, show_progress=False)
    return Engine.from_config(cfg)


def build_store(model: str, prompts: list[str], store_opts: dict, path: str, args) -> float:
    opts = {**store_opts, "map_store": path, "fresh": True, "learn": True, "capacity": args.capacity}
    engine = engine_for(model, "finemoe", opts, None, args.batch)
    t0 = time.perf_counter()
    engine.run(make_requests(engine, prompts, args.prompt_tokens, args.new_tokens))
    engine.close()
    return time.perf_counter() - t0


def evaluate(model: str, policy: str, options: dict, prompts: list[str], args) -> dict:
    engine = engine_for(model, policy, options, args.budget, args.eval_batch)
    reqs = engine.run(make_requests(engine, prompts, args.prompt_tokens, args.new_tokens))
    s = engine.summary(reqs)
    state = engine.policy.state_dict()
    engine.close()
    iters = state.get("iterations", 0)
    return {"hit_rate": s["hit_rate"], "misses_per_token": s["misses"] / s["output_tokens"],
            "bytes_per_token": s["bytes_per_token"], "prefetch_copies": s["prefetch_copies"],
            "wasted_prefetches": s["wasted_prefetches"],
            "policy_critical_ms_per_iteration": 1e3 * state["critical_path_s"] / iters if iters else None}


def store_key(options: dict) -> tuple[str, str]:
    return options.get("semantic", "token"), options.get("prefill", "mean")


def run(args) -> dict:
    build, held_out = split_prompts(args.prompts, args.build, args.eval, args.seed)
    results, stores = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            policy, options = VARIANTS[name]
            options = dict(options)
            if policy == "finemoe":
                key = store_key(options)
                if key not in stores:
                    stores[key] = os.path.join(tmp, f"store-{key[0]}-{key[1]}.safetensors")
                    secs = build_store(args.model, build, {"semantic": key[0], "prefill": key[1]}, stores[key], args)
                    print(f"built store {key} in {secs:.1f}s", file=sys.stderr)
                options = {"learn": False, **options, "map_store": stores[key]}
            t0 = time.perf_counter()
            results[name] = evaluate(args.model, policy, options, held_out, args)
            results[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{name:26s} {json.dumps(results[name])}", file=sys.stderr)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="../shared/models/ref-moe")
    p.add_argument("--prompts", default="../shared/data/prompts/arena_hard_v01.jsonl")
    p.add_argument("--build", type=int, default=350)
    p.add_argument("--eval", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--budget", default="25%")
    p.add_argument("--capacity", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8, help="batch size while building the store")
    p.add_argument("--eval-batch", type=int, default=1, help="batch size while evaluating")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args)
    print(f"{'variant':26s} {'hit rate':>9s} {'misses/tok':>11s} {'bytes/tok':>11s} {'policy ms/it':>12s}")
    for name, r in results.items():
        ms = r["policy_critical_ms_per_iteration"]
        print(f"{name:26s} {r['hit_rate']:9.3f} {r['misses_per_token']:11.2f} {r['bytes_per_token']:11.0f} "
              f"{(f'{ms:.3f}' if ms is not None else '-'):>12s}")
    out = {"config": vars(args), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

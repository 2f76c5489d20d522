"""FineMoE option variants against moe-infinity and the oracle in the simulator, histories built once
(docs/FINEMOE.md, "Beyond the paper" and "Copy-bound regime").

The same split, traces and cost model as `finemoe bench --simulate` (docs/RESULTS.md, experiment 2), but
each history (map store, MoE-Infinity collection) is built once and kept in `--store-dir`, so many
variants that only change how a store is used are cheap to compare. Variants are written like bench's
(`finemoe/neighbors=4/window=3`; `.../inflight=N` sets the engine's prefetch_inflight for that variant);
`--jobs N` replays N variants at a time.

    python3 benchmarks/finemoe_variants.py --prompts ../shared/data/prompts/arena_hard_v01.jsonl --limit 200 \\
        --variants finemoe,finemoe/neighbors=4,moe-infinity,oracle --trace-dir /tmp/eval/traces \\
        --store-dir /tmp/fm/stores --json out.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys

import torch

from finemoe.config import EngineConfig
from finemoe.engine import Engine
from finemoe.eval.engine_run import cached_trace
from finemoe.eval.history import _STORE_OPTIONS, replay_builder
from finemoe.eval.split import split_indices
from finemoe.eval.variants import HISTORY_OPTION, parse_variants
from finemoe.eval.workload import load_texts, tokenize
from finemoe.simulator import CostModel, Replay

TEMPLATE = "User: {prompt}\n\nAssistant:"
INFLIGHT_OPTION = "inflight"   # `POLICY/.../inflight=N`: the cache's prefetch_inflight for this variant
_STATE: dict = {}          # the loaded traces and embedding, shared with forked replay workers


def history_path(args, variant, build_trace_id: str) -> str | None:
    """The variant's history file in --store-dir (built now if missing), keyed by what changes its contents."""
    if not variant.needs_history:
        return None
    keep = {k: variant.options[k] for k in _STORE_OPTIONS[variant.policy] if k in variant.options}
    key = hashlib.sha256(json.dumps([variant.policy, keep, build_trace_id]).encode()).hexdigest()[:16]
    path = os.path.join(args.store_dir, f"{variant.policy}-{key}.safetensors")
    if not os.path.exists(path):
        build = replay_builder(_STATE["build"], _STATE["embed"])
        build(variant.policy, {**keep, HISTORY_OPTION[variant.policy]: path, "learn": True,
                               **({"fresh": True} if variant.policy == "finemoe" else {})})
        print(f"built {variant.policy} history {keep} -> {path}", file=sys.stderr)
    return path


def replay_one(job: tuple) -> dict:
    variant, path, budget, bandwidth, layer_ms, expert_bytes, inflight = job
    torch.set_num_threads(1)
    opts = dict(variant.options)
    inflight = opts.pop(INFLIGHT_OPTION, inflight)      # an engine knob, not a policy option
    if path is not None:
        opts.update({HISTORY_OPTION[variant.policy]: path, "learn": False})
    if variant.policy == "finemoe":
        opts["embed"] = _STATE["embed"]
    cost = CostModel(expert_bytes, bandwidth, layer_ms / 1e3)
    replay = Replay(_STATE["held"], variant.policy, budget, cost, opts, prefetch_inflight=inflight)
    r = replay.run()
    return {"variant": variant.label, "hit_rate": r["hit_rate"], "bytes_per_token": r["bytes_per_token"],
            "tpot_ms": 1e3 * r["tpot_s"], "ttft_ms": 1e3 * r["ttft_s"], "misses": r["misses"],
            "prefetch_copies": r["prefetch_copies"], "wasted_prefetches": r["wasted_prefetches"],
            "wall_s": r["wall_s"]}


def load(args) -> None:
    texts = load_texts([args.prompts], args.limit, args.seed)
    build_idx, held_idx = split_indices(len(texts), args.split, args.seed)
    engine = Engine.from_config(EngineConfig(model=args.model, device="cpu", show_progress=False, seed=args.seed))
    prompts = tokenize(engine.tokenizer, texts, TEMPLATE, args.max_prompt_tokens)
    _STATE["build"] = cached_trace(args.trace_dir, engine, [prompts[i] for i in build_idx], args.max_new_tokens, 8)
    _STATE["held"] = cached_trace(args.trace_dir, engine, [prompts[i] for i in held_idx], args.max_new_tokens, 8)
    _STATE["embed"] = engine.model.get_input_embeddings()
    _STATE["build_id"] = f"{args.model}|{args.prompts}|{args.limit}|{args.split}|{args.seed}|" \
                         f"{args.max_prompt_tokens}|{args.max_new_tokens}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="../shared/models/ref-moe")
    p.add_argument("--prompts", default="../shared/data/prompts/arena_hard_v01.jsonl")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--split", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--budget", default="25%")
    p.add_argument("--bandwidth", type=float, default=53.0, help="GB/s (inf: free copies)")
    p.add_argument("--layer-time-ms", type=float, default=1.6)
    p.add_argument("--expert-bytes", type=int, default=17301504)
    p.add_argument("--prefetch-inflight", type=int, default=4,
                   help="prefetch copies in flight at once (per variant: POLICY/inflight=N)")
    p.add_argument("--variants", default="finemoe,moe-infinity,oracle")
    p.add_argument("--trace-dir", default="/tmp/eval/traces")
    p.add_argument("--store-dir", default="/tmp/finemoe-variant-stores")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.store_dir, exist_ok=True)
    load(args)
    variants = parse_variants(args.variants)
    jobs = [(v, history_path(args, v, _STATE["build_id"]), args.budget, args.bandwidth * 1e9, args.layer_time_ms,
             args.expert_bytes, args.prefetch_inflight) for v in variants]
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            rows = pool.map(replay_one, jobs, chunksize=1)
    else:
        rows = [replay_one(j) for j in jobs]
    print(f"{'variant':44s} {'hit rate':>8s} {'MB/token':>9s} {'TPOT ms':>8s} {'TTFT ms':>8s} {'wasted':>7s}")
    for r in rows:
        print(f"{r['variant']:44s} {r['hit_rate']:8.4f} {r['bytes_per_token'] / 1e6:9.1f} {r['tpot_ms']:8.2f} "
              f"{r['ttft_ms']:8.1f} {r['wasted_prefetches']:7d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

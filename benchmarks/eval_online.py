"""docs/RESULTS.md, section 6 (its table and plot): online serving with Azure LLM-inference arrival times, histories
starting empty and learning online; latency CDF per policy from the simulator's cost model plus a FCFS queue.

    python3 benchmarks/eval_online.py --trace-dir /tmp/eval/traces --out docs/results/exp6-online.png \\
        --json docs/results/exp6-online.json
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from finemoe.config import EngineConfig
from finemoe.engine import Engine
from finemoe.eval.engine_run import cached_trace
from finemoe.eval.online import fcfs_queue, load_arrivals, scale_to_load, service_times
from finemoe.eval.plots import plot_cdf
from finemoe.eval.split import split_indices
from finemoe.eval.workload import load_texts, tokenize
from finemoe.simulator import CostModel, Replay

TEMPLATE = "User: {prompt}\n\nAssistant:"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="../shared/models/ref-moe")
    p.add_argument("--prompts", default="../shared/data/prompts/arena_hard_v01.jsonl")
    p.add_argument("--limit", type=int, default=200, help="prompts subsampled as in `finemoe bench --limit`")
    p.add_argument("--arrivals", default="../shared/data/workloads/azure_conv.csv")
    p.add_argument("--policies", default="finemoe,moe-infinity,lfu,lru,oracle")
    p.add_argument("--expert-budget", default="25%")
    p.add_argument("--utilization", type=float, default=0.8, help="offered load relative to lru's mean service")
    p.add_argument("--bandwidth", type=float, default=48.4, help="GB/s (H100 calibration, docs/BENCHMARKS.md run 15)")
    p.add_argument("--layer-time-ms", type=float, default=0.343, help="one MoE layer's compute (H100, run 15)")
    p.add_argument("--host-layer-ms", type=float, default=0.101,
                   help="host round trip before an offloaded layer's experts (H100, run 15)")
    p.add_argument("--expert-bytes", type=int, default=17301504)
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--trace-dir", default=None)
    p.add_argument("--out", default="exp6-online.png")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    engine = Engine.from_config(EngineConfig(model=args.model, device="cpu", show_progress=False))
    prompts = tokenize(engine.tokenizer, load_texts([args.prompts], args.limit, 0), TEMPLATE, args.max_prompt_tokens)
    build, _ = split_indices(len(prompts), 0.7, 0)          # the bench's build split: its trace is cached
    trace = cached_trace(args.trace_dir, engine, [prompts[i] for i in build], args.max_new_tokens, 8)
    embed = engine.model.get_input_embeddings()
    cost = CostModel(args.expert_bytes, args.bandwidth * 1e9, args.layer_time_ms / 1e3, args.host_layer_ms / 1e3)
    served = {}
    for name in args.policies.split(","):
        opts = {"learn": True, "embed": embed} if name == "finemoe" else {}
        replay = Replay(trace, name, args.expert_budget, cost, opts)
        row = replay.run()
        served[name] = (service_times(replay.metrics), row["hit_rate"])
        print(f"served {name}: hit rate {row['hit_rate']:.4f}", file=sys.stderr)
    base = served["lru"][0][0] if "lru" in served else next(iter(served.values()))[0][0]
    arrivals = scale_to_load(load_arrivals(args.arrivals, trace.num_requests), float(base.mean()), args.utilization)
    results, cdf = {}, {}
    for name, ((service, first), hit) in served.items():
        q = fcfs_queue(arrivals, service, first)
        cdf[name] = q["latency_s"].tolist()
        results[name] = {"hit_rate": hit, "mean_service_s": float(service.mean()),
                         **{f"latency_p{k}_s": float(np.percentile(q["latency_s"], k)) for k in (50, 90, 99)},
                         **{f"ttft_p{k}_s": float(np.percentile(q["ttft_s"], k)) for k in (50, 90, 99)}}
    plot_cdf(cdf, args.out, f"online: {trace.num_requests} requests, Azure conv arrivals at {args.utilization:.0%} "
                            f"of lru's capacity, {args.expert_budget} budget (simulated)")
    print(f"{'policy':14s}{'hit rate':>9s}{'service s':>10s}{'p50 s':>8s}{'p90 s':>8s}{'p99 s':>8s}{'TTFT p50':>9s}")
    for name, r in results.items():
        print(f"{name:14s}{r['hit_rate']:9.4f}{r['mean_service_s']:10.3f}{r['latency_p50_s']:8.2f}"
              f"{r['latency_p90_s']:8.2f}{r['latency_p99_s']:8.2f}{r['ttft_p50_s']:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "arrival_span_s": float(arrivals[-1]), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

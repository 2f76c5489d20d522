"""Where a policy's host time goes in the engine: cProfile of serving routing-replayed requests.

    PYTHONPATH=src:benchmarks python3 benchmarks/profile_policy_host.py --trace .carry/refmoe_lmsys64.safetensors \
        --policy finemoe/async_search=false --device cuda --out $OUT

Builds the Qwen1.5-MoE-shaped model with the trace's layer count (random weights, routing replayed from the
trace, as bench_policies_gpu.py), learns the policy's history on `--build` requests, then profiles serving
`--eval` more at `--budget`. Prints the top functions by own time and the policy's critical-path time per
iteration; writes the stats as text under --out.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats

import numpy as np

from bench_policies_gpu import serve
from benchmarks_common import build_model
from finemoe.config import EngineConfig
from finemoe.engine import Engine
from finemoe.engine.replay import RoutingReplay
from finemoe.eval.variants import parse_variants
from finemoe.models.default import default_tokenizer
from finemoe.models.loader import LoadedModel
from finemoe.traces.format import load_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--policy", default="finemoe")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--build", type=int, default=24)
    ap.add_argument("--eval", type=int, default=6)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    trace = load_trace(args.trace)
    order = np.random.default_rng(0).permutation(trace.num_requests).tolist()
    build, held = order[:args.build], order[args.build:args.build + args.eval]
    model = build_model(trace.num_layers, 0, args.device, args.tiny)
    engine = Engine(LoadedModel(model, default_tokenizer(), "qwen1.5-moe-shape-random", "profile"),
                    EngineConfig(device=args.device, policy="resident", show_progress=False))
    replay = RoutingReplay(engine, trace)
    v = parse_variants(args.policy)[0]
    opts = dict(v.options)
    if v.policy == "finemoe":
        store = os.path.join(args.out, "profile_store.safetensors")
        engine.reconfigure(v.policy, args.budget, {**opts, "map_store": store, "fresh": True, "learn": True})
        serve(engine, replay, build)
        opts = {**opts, "map_store": store, "learn": False}
    elif v.policy == "oracle":
        opts = {**opts, "trace": trace}
    engine.reconfigure(v.policy, args.budget, opts)
    serve(engine, replay, held[:1])                                                # warm-up (graph capture)
    prof = cProfile.Profile()
    prof.enable()
    reqs = serve(engine, replay, held[1:])
    prof.disable()
    s = engine.summary(reqs)
    crit, its = getattr(engine.policy, "critical_s", None), getattr(engine.policy, "iterations", 0)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
    with open(os.path.join(args.out, "profile_policy_host.txt"), "w") as f:
        f.write(buf.getvalue())
    print(buf.getvalue()[-12000:])
    extra = f"; policy critical path {1e3 * crit / its:.3f} ms/iteration" if crit is not None and its else ""
    print(f"{v.label} at {args.budget}: TPOT {s['tpot_s'] * 1e3:.2f} ms (under the profiler), hit {s['hit_rate']:.3f}{extra}")


if __name__ == "__main__":
    main()

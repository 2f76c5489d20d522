"""Hybrid miss execution on the GPU (`--miss-compute gpu|cpu|auto`, issue 21 item 1): each policy at a budget,
batch 1, with every miss copied (gpu, exact), every miss computed on the host CPU (cpu), and the calibrated
split (auto).

A Qwen1.5-MoE-A2.7B-shaped random bf16 model with the trace's number of layers computes while its routers'
choices are replaced by a recorded trace of the trained reference model (engine/replay.py), as in
bench_policies_gpu.py: requests are split (seeded) into a build part, which teaches finemoe's map store and
moe-infinity's collection (in gpu mode), and held-out requests, which every policy x mode serves.
Per row: TPOT median, TTFT, hit rate, MB copied per token, CPU-computed experts per token; for cpu/auto rows,
greedy-token agreement with the same policy's gpu row and the largest relative logit error
(max |l - l_gpu| / max |l_gpu| over each request's steps up to its first differing token). Every mode decodes
with the segmented CUDA graphs (a hybrid layer's CPU half runs between segment replays: engine/cpu_misses.py);
a mode suffixed `-eager` (default: `auto-eager`) decodes without them, and its row also reports its agreement
with the same mode's graph row (`vs_graph`: the two paths run the same ops and should agree exactly, up to the
timing-dependent hits of in-flight copies) and so what the graphs save a hybrid mode.
Also recorded: the calibrated MissCosts and the raw measurements behind them (one expert's copy time; its CPU
time at 1, 4 and 16 tokens with the configured threads). Short table printed last; full JSON to --out.

    PYTHONPATH=src:benchmarks python3 benchmarks/hybrid_gpu.py --trace .carry/refmoe_lmsys64.safetensors \\
        --out $OUT/hybrid_gpu.json
CPU smoke run (tiny widths): --device cpu --tiny.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import torch

from benchmarks_common import replayed_model
from finemoe.eval.split import shuffled_split
from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine.replay import RoutingReplay
from finemoe.experts import calibration
from finemoe.traces.format import load_trace

MISS_MODES = ("gpu", "cpu", "auto")
MODES = MISS_MODES + tuple(f"{m}-eager" for m in MISS_MODES)
DEFAULT_MODES = ("gpu", "cpu", "auto", "auto-eager")


class LogitsEngine(Engine):
    """Keeps every iteration's last-token logits [B, V] on the host while `keep` is set."""

    keep = False

    def iterate(self, it, token_rows, forward):
        out = super().iterate(it, token_rows, forward)
        if self.keep:
            self.logits.append(out.to("cpu"))
        return out


def serve(engine: LogitsEngine, replay: RoutingReplay, idx: list[int], keep: bool = False):
    """Batch 1, one request at a time -> (requests, per request: logits [steps, V] or None)."""
    reqs, logits = [], []
    engine.keep = keep
    for r in idx:
        engine.logits = []
        req = replay.request_for(r, SamplingParams())
        engine.run([req])
        reqs.append(req)
        logits.append(torch.cat(engine.logits) if keep else None)
    engine.keep = False
    return reqs, logits


def agreement(want: list, got: list, want_logits: list, got_logits: list) -> dict:
    """Greedy-token agreement (fraction of positions equal) and the largest relative logit error over each
    request's steps up to and including its first differing token (later steps see different inputs)."""
    same = total = 0
    worst = 0.0
    for a, b, la, lb in zip(want, got, want_logits, got_logits):
        ta, tb = a.output_ids, b.output_ids
        eq = [x == y for x, y in zip(ta, tb)]
        same, total = same + sum(eq), total + len(ta)
        upto = eq.index(False) + 1 if False in eq else len(eq)
        err = (lb[:upto] - la[:upto]).abs().amax(dim=1) / la[:upto].abs().amax(dim=1).clamp_min(1e-12)
        worst = max(worst, float(err.max()))
    return {"token_agreement": same / total if total else float("nan"), "max_rel_logit_error": worst}


def raw_costs(engine: Engine) -> dict:
    """The measurements behind the calibrated MissCosts (experts/calibration.py), with the engine's threads."""
    layer0 = engine.layers[0].experts
    cpu = calibration.cpu_seconds(engine.store, layer0, int(engine.model.config.hidden_size))
    return {"copy_ms": calibration.copy_seconds(engine.store, engine.device) * 1e3,
            "cpu_ms_by_tokens": {str(t): s * 1e3 for t, s in cpu.items()},
            "expert_bytes": engine.geometry.expert_bytes, "cpu_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policies", default="lru,moe-infinity,finemoe")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"among {', '.join(MODES)}; gpu required")
    ap.add_argument("--split", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=16)
    ap.add_argument("--build-limit", type=int, default=40)
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test of this script)")
    ap.add_argument("--out", default="hybrid_gpu.json")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if not modes or modes[0] != "gpu" or set(modes) - set(MODES):
        raise SystemExit(f"--modes must start with gpu and be among {', '.join(MODES)}")
    trace = load_trace(args.trace)
    build, held = shuffled_split(trace.num_requests, args.split, args.seed)
    build, held = build[:args.build_limit].tolist(), held[:args.eval_limit].tolist()
    engine = LogitsEngine(replayed_model(trace, args.device, args.tiny),
                          EngineConfig(device=args.device, policy="resident", show_progress=False,
                                       cpu_threads=args.cpu_threads))
    replay = RoutingReplay(engine, trace)
    serve(engine, replay, held[:2])   # warm-up
    engine.reconfigure("lru", args.budget, miss_compute="auto")   # calibrates, once, with the engine's threads
    costs = engine.miss_costs
    raw = raw_costs(engine)
    rows, t_all, stores = [], time.perf_counter(), tempfile.mkdtemp(prefix="hybrid_gpu_")
    for policy in args.policies.split(","):
        opts: dict = {}
        if policy == "finemoe":
            path = os.path.join(stores, "store.safetensors")
            engine.reconfigure(policy, args.budget, {"map_store": path, "fresh": True, "learn": True},
                               miss_compute="gpu")
            serve(engine, replay, build)
            opts = {"map_store": path, "learn": False}
        elif policy == "moe-infinity":
            path = os.path.join(stores, "collection.safetensors")
            engine.reconfigure(policy, args.budget, {"collection": path, "learn": True}, miss_compute="gpu")
            serve(engine, replay, build)
            opts = {"collection": path, "learn": False}
        served = {}
        for mode in modes:
            miss = mode.removesuffix("-eager")
            engine.reconfigure(policy, args.budget, opts, cuda_graphs=miss == mode, miss_compute=miss)
            reqs, logits = serve(engine, replay, held, keep=True)
            if mode == "gpu" or f"{mode}-eager" in modes:   # compared with later rows
                served[mode] = (reqs, logits)
            s = engine.summary(reqs)
            tokens = s["output_tokens"]
            row = {"policy": policy, "mode": mode, "tpot_s": s["tpot_s"], "ttft_s": s["ttft_s"],
                   "hit_rate": s["hit_rate"], "hits": s["hits"], "misses": s["misses"],
                   "bytes_per_token": s["bytes_per_token"], "cpu_experts": s["cpu_experts"],
                   "cpu_experts_per_token": s["cpu_experts"] / tokens if tokens else 0.0,
                   "decode_path": s["decode_path"]}
            if mode != "gpu":
                gpu_reqs, gpu_logits = served["gpu"]
                row.update(agreement(gpu_reqs, reqs, gpu_logits, logits))
            if miss != mode and miss in served:
                graph_reqs, graph_logits = served[miss]
                row["vs_graph"] = agreement(graph_reqs, reqs, graph_logits, logits)
            rows.append(row)
            print(f"  {policy} {mode}: TPOT {row['tpot_s'] * 1e3:.2f} ms hit {row['hit_rate']:.3f} "
                  f"cpu/token {row['cpu_experts_per_token']:.2f}", flush=True)
    engine.reconfigure("lru", args.budget, miss_compute="gpu")
    cuda = engine.device.type == "cuda"
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "trace": args.trace, "layers": trace.num_layers, "budget": args.budget,
              "build_requests": len(build), "eval_requests": len(held), "miss_costs": dataclasses.asdict(costs),
              "raw_costs": raw, "rows": rows, "wall_s": time.perf_counter() - t_all}
    engine.close()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']}; {trace.num_layers} layers; budget {args.budget}; {len(held)} held-out requests, "
          f"batch 1; {raw['cpu_threads']} CPU threads")
    print(f"one expert ({raw['expert_bytes'] / 1e6:.1f} MB): copy {raw['copy_ms']:.3f} ms; CPU "
          + ", ".join(f"{t} tok {ms:.3f} ms" for t, ms in raw["cpu_ms_by_tokens"].items())
          + f"; fitted {calibration.describe(costs, raw['cpu_threads'])}")
    print(f"{'policy':14s} {'mode':10s} {'path':5s} {'TPOT ms':>8s} {'TTFT ms':>8s} {'hit':>6s} {'MB/tok':>7s} "
          f"{'cpu/tok':>7s} {'agree':>6s} {'max rel err':>11s} {'vs graph':>8s}")
    for r in rows:
        agree = f"{r['token_agreement']:6.3f}" if "token_agreement" in r else f"{'-':>6s}"
        err = f"{r['max_rel_logit_error']:11.2e}" if "max_rel_logit_error" in r else f"{'-':>11s}"
        vs_graph = f"{r['vs_graph']['token_agreement']:8.3f}" if "vs_graph" in r else f"{'-':>8s}"
        path = "graph" if r["decode_path"].startswith("CUDA graphs") else "eager"
        print(f"{r['policy']:14s} {r['mode']:10s} {path:5s} {r['tpot_s'] * 1e3:8.2f} {r['ttft_s'] * 1e3:8.1f} "
              f"{r['hit_rate']:6.3f} {r['bytes_per_token'] / 1e6:7.1f} {r['cpu_experts_per_token']:7.2f} "
              f"{agree} {err} {vs_graph}")
    return result


if __name__ == "__main__":
    main()

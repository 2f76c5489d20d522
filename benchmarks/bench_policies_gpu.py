"""Policies at real scale on the GPU, under learned routing, plus simulator validation (docs/BENCHMARKS.md,
"Policies at real scale"; the GPU table of docs/RESULTS.md).

A Qwen1.5-MoE-A2.7B-shaped random bf16 model (60 experts, top-4, 17.3 MB experts) with the
reference model's number of layers computes; its routers' choices are replaced by a recorded trace of
the trained reference model (engine/replay.py), so the expert cache sees learned routing at real
expert sizes. Trace requests are split 70/30 (seeded): histories (finemoe map store, moe-infinity
collection) are learned by serving the build part, then every policy serves the held-out part at batch 1.
The simulator then predicts TPOT for the same held-out requests, calibrated on separate requests (the
first build requests): pinned bandwidth, per-layer time from `resident`, and the per-layer host round trip
from `lru` at 100% once warm (every use a hit, so the extra time over resident is the routing sync and
cache work of the offloading path). The copy bandwidth comes two ways: raw (pinned copies alone) and fitted
(the rate at which the simulator's lru TPOT on the calibration requests at the budget equals the engine's,
`fit_bandwidth`); the table compares both predictions with measurement.
Speculative policies (mixtral-offloading, promoe) need the real router and hidden states: they are not
meaningful under replay and are reported from the reference model on CPU (docs/RESULTS.md).

    PYTHONPATH=src:benchmarks python3 benchmarks/bench_policies_gpu.py \\
        --trace .carry/refmoe_lmsys64.safetensors --out $OUT
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

from bench_engine import raw_pinned_copy_gbps
from benchmarks_common import serve_replayed, replayed_model
from finemoe.eval.split import shuffled_split
from finemoe.config import EngineConfig
from finemoe.engine import Engine
from finemoe.engine.replay import RoutingReplay
from finemoe.eval.variants import parse_variants
from finemoe.simulator.replay import Replay
from finemoe.simulator.transport import CostModel
from finemoe.traces.format import Trace, load_trace


def subset(trace: Trace, idx: list[int]) -> Trace:
    """A trace of the given requests (in that order)."""
    parts = [(int(trace.offsets[r]), int(trace.offsets[r + 1])) for r in idx]
    rows = np.concatenate([np.arange(a, b) for a, b in parts])
    lengths = np.array([b - a for a, b in parts])
    return Trace(trace.model, trace.num_layers, trace.num_experts, trace.top_k,
                 np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), trace.prompt_lens[idx].copy(),
                 trace.iterations[idx].copy(), trace.token_ids[rows], trace.topk[rows],
                 None if trace.probs is None else trace.probs[rows], trace.expert_bytes, trace.probs_note,
                 trace.source, [trace.request_ids[r] for r in idx], [trace.prompt_texts[r] for r in idx])


def policy_time_per_layer(engine: Engine, reqs: list, layers: int) -> float:
    """The policy's own host time per layer over `reqs` (its critical path: callbacks on the engine thread),
    for the simulator's `policy_layer_s`; 0 for policies that do not measure it (their work is in the
    host round trip calibrated from lru)."""
    policy = engine.policy
    crit, its = getattr(policy, "critical_s", None), getattr(policy, "iterations", 0)
    return crit / its / layers if crit is not None and its else 0.0


def fit_bandwidth(trace: Trace, budget: str, cost: CostModel, target_tpot_s: float, raw_Bps: float) -> float:
    """The copy bandwidth (B/s) at which the simulator's lru TPOT on `trace` equals the engine's measured
    `target_tpot_s` on the same requests: an effective rate that folds in what raw copies do not show (per-copy
    issue cost, copies contending with compute). Bisection in log space over [raw / 3, raw * 3]."""
    lo, hi = raw_Bps / 3, raw_Bps * 3
    for _ in range(16):
        mid = (lo * hi) ** 0.5
        tpot = Replay(trace, "lru", budget, dataclasses.replace(cost, bandwidth_Bps=mid)).run()["tpot_s"]
        lo, hi = (mid, hi) if tpot > target_tpot_s else (lo, mid)
    return (lo * hi) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", required=True)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policies", default="lru,lfu,deepspeed,moe-infinity,finemoe,oracle")
    ap.add_argument("--simulate", default="lru,deepspeed,oracle,finemoe")
    ap.add_argument("--split", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=16)
    ap.add_argument("--calibrate", type=int, default=8, help="build requests that calibrate the simulator")
    ap.add_argument("--build-limit", type=int, default=40)
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test of this script)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    trace = load_trace(args.trace)
    build, held = shuffled_split(trace.num_requests, args.split, args.seed)
    build, held = build[:args.build_limit].tolist(), held[:args.eval_limit].tolist()
    engine = Engine(replayed_model(trace, args.device, args.tiny),
                    EngineConfig(device=args.device, policy="resident", show_progress=False))
    replay = RoutingReplay(engine, trace)
    serve_replayed(engine, replay, held[:2])  # warm-up
    rows, t_all = [], time.perf_counter()

    def measure(name: str, reqs, policy) -> dict:
        s = engine.summary(reqs)
        crit = getattr(policy, "critical_s", None)
        its = getattr(policy, "iterations", 0)
        row = {"policy": name, "ttft_s": s["ttft_s"], "tpot_s": s["tpot_s"], "hit_rate": s["hit_rate"],
               "hits": s["hits"], "misses": s["misses"], "bytes_per_token": s["bytes_per_token"],
               "bytes_copied": s["bytes_copied"], "stall_s": s["stall_s"],
               "expert_budget_bytes": s["expert_budget_bytes"],
               "policy_critical_ms_per_iter": (1e3 * crit / its) if crit is not None and its else None}
        print(f"  {name}: TPOT {row['tpot_s'] * 1e3:.2f} ms hit {row['hit_rate']:.3f}", flush=True)
        return row

    calib = build[:args.calibrate]
    L = trace.num_layers
    resident_calib = engine.summary(serve_replayed(engine, replay, calib))["tpot_s"]
    engine.reconfigure("lru", "100%")
    serve_replayed(engine, replay, calib)                                                   # fill the cache
    lru_full_calib = engine.summary(serve_replayed(engine, replay, calib))["tpot_s"]        # every use a hit
    layer_time, host_layer = resident_calib / L, max(lru_full_calib - resident_calib, 0.0) / L
    engine.reconfigure("lru", args.budget)
    lru_budget_calib = engine.summary(serve_replayed(engine, replay, calib))["tpot_s"]   # cold, as the simulator
    engine.reconfigure("resident", None)
    rows.append(measure("resident", serve_replayed(engine, replay, held), engine.policy))
    eb = engine.geometry.expert_bytes
    raw = max(raw_pinned_copy_gbps(60 * eb, reps=9), raw_pinned_copy_gbps(60 * eb, chunks=60, reps=9)) if cuda else 25.0
    stores, policy_layer_s = {}, {}
    for v in parse_variants(args.policies):
        name, opts = v.policy, dict(v.options)
        if name == "oracle":
            opts = {**opts, "trace": trace}
        elif name == "finemoe":
            stores[v.label] = os.path.join(args.out, f"store_{len(stores)}.safetensors")
            engine.reconfigure(name, args.budget, {**opts, "map_store": stores[v.label], "fresh": True, "learn": True})
            serve_replayed(engine, replay, build)
            opts = {**opts, "map_store": stores[v.label], "learn": False}
        elif name == "moe-infinity":
            stores[v.label] = os.path.join(args.out, f"collection_{len(stores)}.safetensors")
            engine.reconfigure(name, args.budget, {**opts, "collection": stores[v.label], "learn": True})
            serve_replayed(engine, replay, build)
            opts = {**opts, "collection": stores[v.label], "learn": False}
        engine.reconfigure(name, args.budget, opts)
        policy_layer_s[v.label] = policy_time_per_layer(engine, serve_replayed(engine, replay, calib), L)
        engine.reconfigure(name, args.budget, opts)
        rows.append(measure(v.label, serve_replayed(engine, replay, held), engine.policy))
    engine.reconfigure("resident", None)
    sims = []
    held_trace = subset(trace, held)
    cost = CostModel(eb, raw * 1e9, layer_time, host_layer)
    fitted = fit_bandwidth(subset(trace, calib), args.budget, cost, lru_budget_calib, raw * 1e9)
    costs = {"raw": cost, "fitted": dataclasses.replace(cost, bandwidth_Bps=fitted)}
    host_embed = torch.nn.Embedding.from_pretrained(engine.model.get_input_embeddings().weight.detach().cpu())
    build_trace = subset(trace, build)
    for v in parse_variants(args.simulate):
        name, opts, kw = v.policy, dict(v.options), {}
        if name == "finemoe":  # the simulator learns its own store from the build part, as the engine did
            kw = {"embed": host_embed}
            sim_store = os.path.join(args.out, f"sim_store_{len(sims)}.safetensors")
            Replay(build_trace, name, args.budget, cost, {**opts, "map_store": sim_store, "fresh": True, "learn": True},
                   **kw).run()
            opts = {**opts, "map_store": sim_store, "learn": False}
        elif name == "moe-infinity":
            sim_coll = os.path.join(args.out, f"sim_collection_{len(sims)}.safetensors")
            Replay(build_trace, name, args.budget, cost, {**opts, "collection": sim_coll, "learn": True}).run()
            opts = {**opts, "collection": sim_coll, "learn": False}
        meas = next((r for r in rows if r["policy"] == v.label), None)
        if meas is None:
            print(f"  (simulated {v.label!r} has no engine row to compare with; skipped)")
            continue
        p_s = policy_layer_s.get(v.label, 0.0)
        for calibration, c in costs.items():
            sim = Replay(held_trace, name, args.budget, dataclasses.replace(c, policy_layer_s=p_s), opts, **kw).run()
            sims.append({"policy": v.label, "bandwidth": calibration, "sim_tpot_s": sim["tpot_s"],
                         "engine_tpot_s": meas["tpot_s"], "error": sim["tpot_s"] / meas["tpot_s"] - 1,
                         "sim_hit_rate": sim["hit_rate"], "engine_hit_rate": meas["hit_rate"],
                         "sim_ttft_s": sim["ttft_s"],
                         "engine_ttft_s": meas["ttft_s"], "sim_bytes_per_token": sim["bytes_per_token"],
                         "engine_bytes_per_token": meas["bytes_per_token"], "calibrated_policy_layer_ms": p_s * 1e3})
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "trace": args.trace,
              "trace_model": trace.model, "layers": trace.num_layers, "build_requests": len(build),
              "eval_requests": len(held), "budget": args.budget, "raw_pinned_gbps": raw,
              "calibrated_layer_time_ms": layer_time * 1e3, "calibrated_host_layer_ms": host_layer * 1e3,
              "calibration_requests": len(calib), "lru_calibration_tpot_s": lru_budget_calib,
              "fitted_bandwidth_gbps": fitted / 1e9, "rows": rows, "simulator": sims,
              "wall_s": time.perf_counter() - t_all}
    with open(os.path.join(args.out, "bench_policies_gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']}; {trace.num_layers} layers; budget {args.budget}; raw pinned {raw:.1f} GB/s; "
          f"fitted {fitted / 1e9:.1f} GB/s; layer time {layer_time * 1e3:.3f} ms, host {host_layer * 1e3:.3f} ms "
          f"(from {len(calib)} build requests); "
          f"build {len(build)} / eval {len(held)} requests")
    print(f"{'policy':34s} {'TTFT ms':>8s} {'TPOT ms':>8s} {'hit':>6s} {'MB/tok':>7s} {'stall s':>8s} "
          f"{'policy ms/it':>12s}")
    for r in rows:
        crit = r["policy_critical_ms_per_iter"]
        pc = f"{crit:12.3f}" if crit is not None else f"{'-':>12s}"
        print(f"{r['policy']:34s} {r['ttft_s'] * 1e3:8.1f} {r['tpot_s'] * 1e3:8.2f} {r['hit_rate']:6.3f} "
              f"{r['bytes_per_token'] / 1e6:7.1f} {r['stall_s']:8.2f} {pc}")
    print(f"{'simulated':34s} {'bandwidth':>9s} {'TPOT sim':>8s} {'TPOT eng':>8s} {'error':>7s}")
    for s in sims:
        print(f"{s['policy']:34s} {s['bandwidth']:>9s} {s['sim_tpot_s'] * 1e3:8.2f} {s['engine_tpot_s'] * 1e3:8.2f} "
              f"{100 * s['error']:6.1f}%")


if __name__ == "__main__":
    main()

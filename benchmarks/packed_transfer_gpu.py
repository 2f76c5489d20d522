"""`--expert-transfer packed` against plain on the GPU: TPOT, bytes and hit rate per policy, and the logits compared
bit for bit (experts/packed_transport.py).

A Qwen1.5-MoE-A2.7B-shaped random bf16 model with the trace's number of layers (seeded: the same weights for both
engines) computes while its routers' choices are replaced by a recorded trace of the trained reference model
(engine/replay.py), as in offload_gpu.py. One engine per transfer mode, built one after the other (load time
includes packing); each serves the seeded held-out requests at batch 1 under every policy (finemoe learning its map
store online from empty, identically in both), untimed once for logits (2 requests), then timed (counting
torch.compile's graphs compiled meanwhile: none expected, the unpack is compiled at start). Prints a short table
last; `--out FILE` writes every number as JSON.

    PYTHONPATH=src:benchmarks python3 benchmarks/packed_transfer_gpu.py --trace .carry/refmoe_lmsys64.safetensors \\
        --out $OUT/packed.json
CPU smoke run (tiny widths): --device cpu --tiny.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch
from torch._dynamo.utils import counters as dynamo_counters

from benchmarks_common import replayed_model, write_json
from finemoe.config import EngineConfig
from finemoe.engine.replay import RoutingReplay
from finemoe.eval.split import shuffled_split
from finemoe.traces.format import load_trace
from offload_gpu import LogitsEngine, serve

TRANSFERS = ("plain", "packed")


def run_transfer(args, trace, held: list[int], transfer: str) -> dict:
    """Every policy's rows and logits under one transfer mode."""
    t0 = time.perf_counter()
    loaded = replayed_model(trace, args.device, args.tiny)
    loaded.model.to(torch.bfloat16)           # the CPU smoke run builds float32; packed needs bf16 experts
    engine = LogitsEngine(loaded,
                          EngineConfig(device=args.device, dtype="bfloat16", policy="lru", expert_budget=args.budget,
                                       prefetch_issue=args.prefetch, expert_transfer=transfer, show_progress=False))
    load_s = time.perf_counter() - t0
    replay = RoutingReplay(engine, trace)
    serve(engine, replay, held[:1])     # warm-up
    out = {"load_s": load_s, "host_expert_bytes": engine.store.nbytes, "copy_bytes": engine.store.copy_bytes,
           "rows": {}, "logits": {}}
    for policy in args.policies.split(","):
        opts = {"fresh": True, "learn": True} if policy == "finemoe" else {}
        engine.reconfigure(policy, args.budget, opts)
        _, logits = serve(engine, replay, held[:2], keep=True)
        engine.reconfigure(policy, args.budget, opts)
        graphs = dynamo_counters["stats"]["unique_graphs"]
        reqs, _ = serve(engine, replay, held)
        s = engine.summary(reqs)
        out["rows"][policy] = {k: s[k] for k in ("tpot_s", "ttft_s", "hit_rate", "hits", "misses", "bytes_per_token",
                                                 "decode_path")}
        out["rows"][policy]["compiles_while_serving"] = dynamo_counters["stats"]["unique_graphs"] - graphs
        out["logits"][policy] = logits
        print(f"  {transfer} {policy}: TPOT {s['tpot_s'] * 1e3:.2f} ms, hit {s['hit_rate']:.3f}, "
              f"{s['bytes_per_token'] / 1e6:.1f} MB/token", flush=True)
    engine.close()
    del engine, replay
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--policies", default="lru,finemoe")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--prefetch", default="inflight", help="--prefetch-issue for every row")
    ap.add_argument("--split", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    trace = load_trace(args.trace)
    _, held = shuffled_split(trace.num_requests, args.split, args.seed)
    held = held[:args.eval_limit].tolist()
    runs = {t: run_transfer(args, trace, held, t) for t in TRANSFERS}
    rows = []
    for policy in args.policies.split(","):
        plain, packed = (runs[t]["rows"][policy] for t in TRANSFERS)
        same = all(torch.equal(a, b) for a, b in zip(*(runs[t]["logits"][policy] for t in TRANSFERS)))
        rows.append({"policy": policy, "plain": plain, "packed": packed,
                     "tpot_ratio": packed["tpot_s"] / plain["tpot_s"],
                     "bytes_ratio": packed["bytes_per_token"] / max(plain["bytes_per_token"], 1e-9),
                     "same_hits": (plain["hits"], plain["misses"]) == (packed["hits"], packed["misses"]),
                     "logits_bit_equal": same})
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "trace": args.trace, "layers": trace.num_layers, "budget": args.budget,
              "prefetch_issue": args.prefetch, "eval_requests": len(held),
              "load_s": {t: runs[t]["load_s"] for t in TRANSFERS},
              "host_expert_bytes": {t: runs[t]["host_expert_bytes"] for t in TRANSFERS},
              "copy_bytes": {t: runs[t]["copy_bytes"] for t in TRANSFERS}, "rows": rows}
    write_json(args.out, result)
    print(f"\n{result['device']}; {trace.num_layers} layers; {len(held)} held-out requests, batch 1, {args.budget}, "
          f"prefetch {args.prefetch}; load {result['load_s']['plain']:.1f} s plain, "
          f"{result['load_s']['packed']:.1f} s packed; expert copy {result['copy_bytes']['plain'] / 1e6:.2f} -> "
          f"{result['copy_bytes']['packed'] / 1e6:.2f} MB")
    print(f"{'policy':10s} {'plain ms':>9s} {'packed ms':>10s} {'ratio':>6s} {'MB/tok':>15s} {'hit':>13s} "
          f"{'same hits':>9s} {'logits equal':>12s}")
    for r in rows:
        print(f"{r['policy']:10s} {r['plain']['tpot_s'] * 1e3:9.2f} {r['packed']['tpot_s'] * 1e3:10.2f} "
              f"{r['tpot_ratio']:6.3f} {r['plain']['bytes_per_token'] / 1e6:7.1f}/"
              f"{r['packed']['bytes_per_token'] / 1e6:7.1f} "
              f"{r['plain']['hit_rate']:6.3f}/{r['packed']['hit_rate']:6.3f} {str(r['same_hits']):>9s} "
              f"{str(r['logits_bit_equal']):>12s}")
    return result


if __name__ == "__main__":
    main()

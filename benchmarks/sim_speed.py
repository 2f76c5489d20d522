"""Simulator speed: requests/s that `finemoe simulate` replays, per policy, on a real trace repeated N times
(docs/BENCHMARKS.md, "Simulator speed").

    python3 benchmarks/sim_speed.py --trace /tmp/sim_trace.safetensors --repeat 16 --out /tmp/sim_speed.json
    python3 benchmarks/sim_speed.py --trace ../shared/data/traces/flame_moe_290m.npz#seq --repeat 4

The trace's requests are concatenated `--repeat` times (request ids made distinct; `oracle` matches the
copies in trace order), so a 64-request trace becomes thousands of requests. Prints one line per policy
(wall and CPU seconds, requests/s, microseconds per MoE layer step) and, with --out, writes the rows as JSON
together with the machine's load average, so before/after numbers can be compared honestly.
`--embed-from MODEL_DIR` adds what finemoe's token semantics need (the recorded model's input embedding).
`--baseline-src DIR` (another version's `src`, e.g. of a `git worktree`) measures before/after: each policy runs
in a fresh process under each version, alternating, `--rounds` times; the best CPU time of each is compared.

    python3 benchmarks/sim_speed.py --trace T --policy lru,finemoe --embed-from ../shared/models/ref-moe \
        --baseline-src /tmp/old/src --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from finemoe.cli.replay_args import input_embedding
from finemoe.simulator import CostModel, simulate
from finemoe.traces import load_trace
from finemoe.traces.format import Trace

RESULT_KEYS = ("hits", "misses", "bytes_copied", "ttft_s", "tpot_s", "prefetch_copies", "wasted_prefetches",
               "simulated_s")


def repeated(trace: Trace, n: int) -> Trace:
    """The trace's requests n times over, one copy after another."""
    if n == 1:
        return trace
    N = trace.num_tokens
    offsets = np.concatenate([[0]] + [trace.offsets[1:] + c * N for c in range(n)]).astype(np.int64)

    def tile(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.concatenate([a] * n)
    return Trace(trace.model, trace.num_layers, trace.num_experts, trace.top_k, offsets,
                 tile(trace.prompt_lens), tile(trace.iterations), tile(trace.token_ids), tile(trace.topk),
                 tile(trace.probs), trace.expert_bytes, trace.probs_note, trace.source,
                 [f"{rid}#{c}" for c in range(n) for rid in trace.request_ids], trace.prompt_texts * n)


def compare(args) -> None:
    """Each policy under the baseline source and under this one, in fresh processes, alternating; best CPU s."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

    def script_of(src: str) -> tuple[str, str]:
        """The sim_speed.py of the checkout that `src` belongs to (each version measured by its own script, which
        imports only what its version has), and its benchmarks folder; this one where that checkout has none."""
        bench = os.path.join(os.path.dirname(os.path.abspath(src)), "benchmarks")
        if not os.path.isfile(os.path.join(bench, "sim_speed.py")):
            bench = os.path.dirname(os.path.abspath(__file__))
        return os.path.join(bench, "sim_speed.py"), bench
    argv = ["--trace", args.trace, "--repeat", str(args.repeat), "--expert-budget", args.expert_budget,
            "--expert-bytes", str(args.expert_bytes), "--bandwidth", str(args.bandwidth),
            "--layer-time-ms", str(args.layer_time_ms)] + (["--embed-from", args.embed_from] if args.embed_from else [])
    rows = []
    for policy in args.policy.split(","):
        best = {}
        for r in range(args.rounds):
            for name in (("baseline", "current") if r % 2 == 0 else ("current", "baseline")):
                src = args.baseline_src if name == "baseline" else here
                script, bench = script_of(src)
                out = subprocess.run([sys.executable, script, *argv, "--policy", policy],
                                     env={**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{bench}"},
                                     capture_output=True, text=True, check=True).stdout
                cpu = float(out.split(" s cpu")[0].split()[-1])
                best[name] = min(best.get(name, float("inf")), cpu)
        rows.append({"policy": policy, "baseline_cpu_s": best["baseline"], "current_cpu_s": best["current"],
                     "ratio": best["current"] / best["baseline"]})
        print(f"  {policy:13s} baseline {best['baseline']:7.2f} s cpu  current {best['current']:7.2f} s cpu  "
              f"ratio {best['current'] / best['baseline']:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"trace": args.trace, "repeat": args.repeat, "rounds": args.rounds,
                       "baseline_src": args.baseline_src, "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--repeat", type=int, default=16, help="concatenate the trace this many times")
    ap.add_argument("--policy", default="lru,lfu,deepspeed,oracle,moe-infinity")
    ap.add_argument("--expert-budget", default="25%")
    ap.add_argument("--expert-bytes", type=int, default=17301504)
    ap.add_argument("--bandwidth", default="25", help="GB/s (inf: free copies)")
    ap.add_argument("--layer-time-ms", type=float, default=0.3)
    ap.add_argument("--embed-from", default=None, help="recorded model's folder (finemoe's token embeddings)")
    ap.add_argument("--baseline-src", default=None, help="another version's src folder: compare before/after")
    ap.add_argument("--rounds", type=int, default=3, help="with --baseline-src: alternations per policy")
    ap.add_argument("--out", default=None, help="write the rows (and the machine's load) as JSON here")
    args = ap.parse_args()
    if args.baseline_src:
        return compare(args)

    trace = repeated(load_trace(args.trace), args.repeat)
    steps = int(trace.iterations.sum()) * trace.num_layers
    cost = CostModel(args.expert_bytes, float(args.bandwidth) * 1e9, args.layer_time_ms / 1e3)   # GB/s (or inf)
    print(f"{args.trace} x{args.repeat}: {trace.num_requests} requests, {steps} MoE layer steps; "
          f"load average {os.getloadavg()[0]:.2f}")
    embed = input_embedding(args.embed_from) if args.embed_from else None     # loaded once, outside the timing
    rows = []
    for policy in args.policy.split(","):
        options = {policy: {"embed": embed}} if embed is not None and policy == "finemoe" else None
        load_before = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        (row,) = simulate(trace, [policy], [args.expert_budget], cost, options)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append({"policy": policy, "requests": trace.num_requests, "layer_steps": steps, "wall_s": wall,
                     "cpu_s": cpu, "requests_per_s": trace.num_requests / wall,
                     "requests_per_cpu_s": trace.num_requests / cpu, "us_per_layer_step": wall / steps * 1e6,
                     "load_avg_1min": [load_before, os.getloadavg()[0]],
                     **{k: row[k] for k in RESULT_KEYS}})
        print(f"  {policy:13s} {wall:7.2f} s wall {cpu:7.2f} s cpu  {trace.num_requests / wall:8.1f} req/s  "
              f"({trace.num_requests / cpu:8.1f} per cpu-s)  {wall / steps * 1e6:6.1f} us/step  "
              f"hits {row['hits']} misses {row['misses']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"trace": args.trace, "repeat": args.repeat, "expert_budget": args.expert_budget,
                       "bandwidth_GBps": float(args.bandwidth), "layer_time_ms": args.layer_time_ms,
                       "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

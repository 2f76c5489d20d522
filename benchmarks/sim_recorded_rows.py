"""The simulator's prediction of every row of a recorded `offload_gpu.py` run, re-run on this machine from the costs
that run recorded (no GPU needed): how far the simulator is from the engine, and with which CPU costs.

For each row of --results (offload_gpu.py's JSON) it replays the row's held-out requests (the same seeded split of
--trace, `--split`, `--seed`, and the recorded numbers of build and held-out requests) through the simulator with the
costs offload_gpu.py gave it: the copy rate of the engine's start-up calibration, the layer time of `resident`, the
host round trip of lru at 100%, the policy's own time per layer, and, for cpu/auto rows, the calibrated CPU costs of
the row's CPU weight dtype scaled as the engine's split had them when the row started. The engine carries that scale
from row to row (engine.reconfigure; it restarts at 1 when the CPU weight dtype changes), so a row's start scale is
the previous cpu/auto row's `cpu_cost_scale_end`; the first cpu/auto row's is its own `cpu_cost_scale_start` (in
runs recorded before offload_gpu.py read it ahead of serving, that field holds the row's end scale).
Each row runs its recorded policy and options (rows recorded without them: lru as `order=recency`, its rule then).
finemoe and moe-infinity learn their simulated histories from the build requests, as offload_gpu.py's did; finemoe's
token semantics read --embed-from's input embedding (offload_gpu.py gave the simulator the random engine model's, which
cannot be rebuilt off the GPU: finemoe rows differ a little from the recorded prediction).

Two predictions per cpu/auto row:
  calibrated  the split and the CPU half by the costs above (what offload_gpu.py predicted; `sim_tpot_s` there)
  measured    the split and the CPU half by the engine's own measured host time per CPU-computed expert in that row:
              (start + wait + compute) / CPU experts (its cpu_*_ms_per_token fields), cpu_layer_s 0 (the layer's
              round trip is inside start and wait), cpu_token_s as calibrated (batch-1 decode has one token per expert)
Each with its error against the engine's TPOT.

    PYTHONPATH=src:benchmarks python3 benchmarks/sim_recorded_rows.py --results docs/results/gpu-offload-hybrid.json \\
        --trace .carry/refmoe_lmsys64.safetensors --embed-from ../shared/models/ref-moe --out $OUT/sim_rows.json
A run of `gpu` rows only (docs/results/gpu-offload-prefetch.json) needs no CPU-cost fields.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from bench_policies_gpu import subset
from finemoe.cli.replay_args import semantic_source
from finemoe.eval.split import shuffled_split
from finemoe.experts.prefetch_issue import PrefetchIssue
from finemoe.simulator.replay import Replay
from finemoe.simulator.transport import CostModel
from finemoe.traces.format import load_trace

HISTORY = {"finemoe": "map_store", "moe-infinity": "collection"}
# rows recorded before offload_gpu.py recorded each row's policy and options: their policies' rules then
LEGACY_OPTIONS = {"lru": {"order": "recency"}}


def row_policy(row: dict) -> tuple[str, dict]:
    """(registered policy name, its options) of a recorded row."""
    if "policy_name" in row:
        return row["policy_name"], dict(row["policy_options"])
    return row["policy"], dict(LEGACY_OPTIONS.get(row["policy"], {}))


def start_scales(rows: list[dict]) -> list[float | None]:
    """Per row, the CPU cost scale the engine's split had when the row started (None for gpu rows): the previous
    cpu/auto row's end scale, 1 after a change of CPU weight dtype, the row's own recorded start for the first."""
    out, prev = [], None
    for r in rows:
        if r["mode"] == "gpu":
            out.append(None)
            continue
        if prev is None:
            out.append(r["cpu_cost_scale_start"])
        else:
            out.append(prev["cpu_cost_scale_end"] if prev["cpu_dtype_choice"] == r["cpu_dtype_choice"] else 1.0)
        prev = r
    return out


def measured_cpu_s(row: dict) -> float:
    """The engine's host seconds per CPU-computed expert in `row`: its CPU halves' start, wait and compute."""
    ms = row["cpu_start_ms_per_token"] + row["cpu_wait_ms_per_token"] + row["cpu_compute_ms_per_token"]
    return ms / row["cpu_experts_per_token"] / 1e3


def learn_histories(result: dict, build_trace, budget: str, embed, base: dict[str, dict],
                    folder: str) -> dict[str, dict]:
    """Each policy's simulator options (`base`'s, plus): finemoe's map store and moe-infinity's collection learned
    from the build requests (as offload_gpu.py learns them)."""
    options = {}
    for row in result["rows"]:
        label = row["policy"]
        if label in options:
            continue
        policy, opts = row_policy(row)
        options[label] = opts | base.get(policy, {})
        key = HISTORY.get(policy)
        if key is None:
            continue
        path = os.path.join(folder, f"{label.replace('/', '_')}.safetensors")
        learn = options[label] | {key: path, "learn": True} | ({"fresh": True} if policy == "finemoe" else {})
        Replay(build_trace, policy, budget, CostModel(result["expert_bytes"]), learn,
               **({"embed": embed} if policy == "finemoe" else {})).run()
        options[label] |= {key: path, "learn": False}
    return options


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="offload_gpu.py's JSON")
    ap.add_argument("--trace", required=True, help="the routing trace that run replayed")
    ap.add_argument("--embed-from", default=None, metavar="MODEL_DIR", help="finemoe's input embedding")
    ap.add_argument("--split", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="gpu,cpu,auto", help="the rows to re-run, by --miss-compute mode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = json.load(open(args.results))
    trace = load_trace(args.trace)
    build, held = shuffled_split(trace.num_requests, args.split, args.seed)
    build_trace = subset(trace, build[:result["build_requests"]].tolist())
    held_trace = subset(trace, held[:result["eval_requests"]].tolist())
    base = {"finemoe": {}}
    embed = semantic_source(args, trace, base, "sim_recorded_rows")
    options = learn_histories(result, build_trace, result["rows"][0]["budget"], embed, base, tempfile.mkdtemp())
    eb, ms = result["expert_bytes"], 1e-3
    modes = args.modes.split(",")
    out = []
    for row, scale in zip(result["rows"], start_scales(result["rows"])):
        if row["mode"] not in modes:
            continue
        calib = result["calibrations"][row["cpu_dtype_choice"] or next(iter(result["calibrations"]))]["costs"]

        def predict(cpu_s: float, cpu_token_s: float, cpu_layer_s: float, row=row, calib=calib) -> dict:
            p = row["policy"]   # the host costs per policy (runs recorded before the serial ones were split: 0)
            cost = CostModel(eb, eb / calib["copy_s"], result["layer_time_ms"] * ms,
                             (result["host_layer_ms"] + result.get("policy_serial_layer_ms", {}).get(p, 0.0)) * ms,
                             result["policy_layer_ms"].get(p, 0.0) * ms, cpu_s, cpu_token_s, cpu_layer_s,
                             result.get("policy_iteration_ms", {}).get(p, 0.0) * ms)
            policy = row_policy(row)[0]
            sim = Replay(held_trace, policy, row["budget"], cost, options[row["policy"]],
                         miss_compute=row["mode"], issue=PrefetchIssue(row["prefetch_issue"]),
                         **({"embed": embed} if policy == "finemoe" else {})).run()
            return {"tpot_s": sim["tpot_s"], "error": sim["tpot_s"] / row["tpot_s"] - 1,
                    "cpu_experts_per_token": sim["cpu_experts"] / sim["output_tokens"]}

        s = scale or 1.0
        entry = {k: row[k] for k in ("policy", "budget", "prefetch_issue", "mode", "cpu_dtype_choice", "tpot_s",
                                     "cpu_experts_per_token")}
        entry.update(recorded_sim_tpot_s=row.get("sim_tpot_s"), cpu_cost_scale_at_start=scale,
                     calibrated=predict(calib["cpu_s"] * s, calib["cpu_token_s"] * s, calib["cpu_fixed_s"]))
        if row["mode"] != "gpu" and row["cpu_experts_per_token"] > 0:
            entry["measured_cpu_ms_per_expert"] = measured_cpu_s(row) * 1e3
            entry["measured"] = predict(measured_cpu_s(row), calib["cpu_token_s"] * s, 0.0)
        out.append(entry)
        print(f"  {row['policy']} {row['budget']} {row['prefetch_issue']} {row['mode']}: engine "
              f"{row['tpot_s'] * 1e3:.2f} ms, simulated {entry['calibrated']['tpot_s'] * 1e3:.2f} ms", flush=True)
    report = {"results": args.results, "trace": args.trace, "embed_from": args.embed_from, "rows": out}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"\n{args.results}: TPOT ms, engine against the simulator (error); CPU experts per token, engine / simulator")
    print(f"{'policy':13s} {'budget':>6s} {'issue':8s} {'mode':5s} {'engine':>7s} {'recorded':>8s} "
          f"{'calibrated':>16s} {'cpu/tok':>11s} {'CPU ms/exp':>10s} {'measured CPU cost':>17s} {'cpu/tok':>11s}")
    for e in out:
        c, m = e["calibrated"], e.get("measured")
        rec = f"{e['recorded_sim_tpot_s'] * 1e3:8.2f}" if e["recorded_sim_tpot_s"] is not None else f"{'-':>8s}"
        line = (f"{e['policy']:13s} {e['budget']:>6s} {e['prefetch_issue']:8s} {e['mode']:5s} "
                f"{e['tpot_s'] * 1e3:7.2f} {rec} {c['tpot_s'] * 1e3:8.2f} ({100 * c['error']:+5.1f}%) "
                f"{e['cpu_experts_per_token']:5.2f}/{c['cpu_experts_per_token']:5.2f}")
        if m is not None:
            line += (f" {e['measured_cpu_ms_per_expert']:10.2f} {m['tpot_s'] * 1e3:8.2f} ({100 * m['error']:+5.1f}%) "
                     f"{e['cpu_experts_per_token']:5.2f}/{m['cpu_experts_per_token']:5.2f}")
        print(line)
    return report


if __name__ == "__main__":
    main()

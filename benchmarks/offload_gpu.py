"""Issue 21 on the GPU: where misses run (`--miss-compute gpu|cpu|auto`) and how prefetches are issued
(`--prefetch-issue inflight|idle|off`), per policy and budget at batch 1, with the simulator's prediction of every
row from costs calibrated on separate requests.

A Qwen1.5-MoE-A2.7B-shaped random bf16 model with the trace's number of layers computes while its routers'
choices are replaced by a recorded trace of the trained reference model (engine/replay.py), as in
bench_policies_gpu.py: requests are split (seeded) into a build part, which teaches finemoe's map store and
moe-infinity's collection (gpu mode, inflight) and calibrates the simulator, and held-out requests, which every
row serves. Rows: policies x budgets x prefetch issue rules x miss modes x CPU weight dtypes (`--cpu-dtypes`: the
CPU half's weights, experts/cpu_weights.py; cpu/auto rows only; `--cpu-kernel` picks the CPU half's kernel for
every such row, experts/cpu_kernel.py). lru and lfu predict nothing: they get one issue
rule. Per row: TPOT median, TTFT, hit rate, MB copied per token, CPU-computed experts per token, the CPU half's
host time per token (starting, waiting for its inputs, computing); for cpu/auto rows, greedy-token agreement with
the same policy, budget and issue rule's gpu row and the largest relative logit error (max |l - l_gpu| /
max |l_gpu| over each request's steps up to its first differing token).
Every mode decodes with the segmented CUDA graphs (a hybrid layer's CPU half runs between segment replays:
engine/cpu_misses.py).

The simulator (`--simulate`, default on) replays the held-out requests of each row with a CostModel calibrated on
the first `--calibrate` build requests, never on held-out ones: copy rate and CPU costs from the engine's start-up
calibration (experts/calibration.py; one per CPU weight dtype), the CPU costs scaled as the engine's split had them
when the row started (engine/cpu_misses.py: the ratio of measured to calibrated CPU-half time, learned first on the
calibration requests, then carried from row to row), layer time from `resident`, host round trip per
layer from lru at 100% once warm, each policy's host time from its gpu run on the calibration requests against
lru's at the same budget (HostCosts: before each layer's compute, serial; beside it; between iterations, serial).
finemoe and moe-infinity learn their simulated histories from the build part, as the engine's
did. Its error against the engine is reported per row.

    PYTHONPATH=src:benchmarks python3 benchmarks/offload_gpu.py --trace .carry/refmoe_lmsys64.safetensors \\
        --out $OUT/offload_gpu.json
CPU smoke run (tiny widths): --device cpu --tiny.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import json
import os
import pstats
import sys
import tempfile
import time
from typing import NamedTuple

import torch

from benchmarks_common import replayed_model
from bench_policies_gpu import subset
from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine.replay import RoutingReplay
from finemoe.eval.split import shuffled_split
from finemoe.eval.variants import parse_variants
from finemoe.experts import calibration
from finemoe.experts.prefetch_issue import PrefetchIssue
from finemoe.simulator.replay import Replay
from finemoe.simulator.transport import CostModel
from finemoe.traces.format import load_trace

MISS_MODES = ("gpu", "cpu", "auto")
NON_PREDICTING = ("lru", "lfu", "deepspeed")


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


@contextlib.contextmanager
def host_profile(out_dir: str | None, name: str):
    """cProfile the block into out_dir/name.pstats and print its ten functions of most own (self) time; nothing
    when out_dir is None."""
    if out_dir is None:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        os.makedirs(out_dir, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        prof.dump_stats(os.path.join(out_dir, f"{safe}.pstats"))
        print(f"  host profile of {name} (own time):", flush=True)
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(10)


def tpot(engine: Engine, reqs: list) -> float:
    return engine.summary(reqs)["tpot_s"]


class HostCosts(NamedTuple):
    """What the simulator charges one policy's host work, from the engine's host timing (engine/stats.py HostTiming)
    on the calibration requests, against lru's at the same budget (whose host work the round trip `host_layer`
    already holds): `serial_layer_s` before each layer's compute (added to the round trip), `overlap_layer_s`
    beside it (CostModel.policy_layer_s), `iteration_s` between iterations (CostModel.policy_iteration_s)."""

    serial_layer_s: float
    overlap_layer_s: float
    iteration_s: float


def measured_host_costs(engine: Engine, reference: dict | None) -> tuple[HostCosts, dict]:
    """(the engine's host costs against `reference`, its host timing report); reference None: this run is lru's."""
    own = engine.runtime.totals.host.report()
    ref, ms = reference or own, 1e-3
    return HostCosts(max(own["host_before_compute_ms_per_layer"] - ref["host_before_compute_ms_per_layer"], 0) * ms,
                     own["host_after_compute_ms_per_layer"] * ms,
                     max(own["host_policy_ms_per_iteration"] - ref["host_policy_ms_per_iteration"], 0) * ms), own


def dtype_label(row: dict) -> str:
    """'-' for gpu rows; the CPU half's weight dtype, after the --cpu-expert-dtype choice when they differ."""
    if row["mode"] == "gpu":
        return "-"
    choice, dtype = row["cpu_dtype_choice"], row["cpu_expert_dtype"]
    return dtype if choice == dtype else f"{choice}:{dtype}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--budgets", default="25%")
    ap.add_argument("--policies", default="lru,moe-infinity,finemoe",
                    help="POLICY[/KEY=VALUE...] variants, comma-separated (e.g. lru/order=recency)")
    ap.add_argument("--modes", default="gpu,cpu,auto", help=f"among {', '.join(MISS_MODES)}; gpu required")
    ap.add_argument("--prefetch", default="inflight", help="issue rules among inflight, idle, off")
    ap.add_argument("--cpu-dtypes", default="auto", help="the CPU half's weights (cpu/auto rows): auto, model, float32")
    ap.add_argument("--cpu-kernel", default="torch", help="the CPU half's kernel (cpu/auto rows): torch, kt-kernel, "
                                                          "auto (kt-kernel: PYTHONPATH with prepare_kt_kernel.py's)")
    ap.add_argument("--split", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=16)
    ap.add_argument("--build-limit", type=int, default=40)
    ap.add_argument("--calibrate", type=int, default=4, help="build requests that calibrate the simulator")
    ap.add_argument("--no-simulate", dest="simulate", action="store_false")
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test of this script)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="profile every row's serving on the host (cProfile): DIR/<row>.pstats, and each row's ten "
                         "functions of most own time printed (rows are slower while profiled)")
    ap.add_argument("--out", default="offload_gpu.json")
    args = ap.parse_args(argv)
    modes, issues = args.modes.split(","), args.prefetch.split(",")
    budgets, dtypes = args.budgets.split(","), args.cpu_dtypes.split(",")
    if not modes or modes[0] != "gpu" or set(modes) - set(MISS_MODES):
        raise SystemExit(f"--modes must start with gpu and be among {', '.join(MISS_MODES)}")
    for issue in issues:
        PrefetchIssue(issue)
    variants = parse_variants(args.policies)
    trace = load_trace(args.trace)
    build, held = shuffled_split(trace.num_requests, args.split, args.seed)
    build, held = build[:args.build_limit].tolist(), held[:args.eval_limit].tolist()
    calib = build[:args.calibrate]
    L = trace.num_layers
    engine = LogitsEngine(replayed_model(trace, args.device, args.tiny),
                          EngineConfig(device=args.device, policy="resident", show_progress=False,
                                       cpu_threads=args.cpu_threads, cpu_kernel=args.cpu_kernel))
    replay = RoutingReplay(engine, trace)
    serve(engine, replay, held[:2])   # warm-up
    t_all, stores = time.perf_counter(), tempfile.mkdtemp(prefix="offload_gpu_")

    # simulator calibration, on build requests only
    layer_time = tpot(engine, serve(engine, replay, calib)[0]) / L
    engine.reconfigure("lru", "100%")
    serve(engine, replay, calib)                                                   # fill the cache
    host_layer = max(tpot(engine, serve(engine, replay, calib)[0]) / L - layer_time, 0.0)
    calibrations = {}
    for dtype in dtypes if set(modes) != {"gpu"} else []:
        engine.reconfigure("lru", budgets[0], miss_compute="auto", cpu_expert_dtype=dtype)   # calibrates
        calibrations[dtype] = engine.calibration
        serve(engine, replay, calib)         # the CPU half's measured-to-calibrated ratio, learned on build requests
    if not calibrations:
        engine.reconfigure("lru", budgets[0], miss_compute="auto")
        calibrations["auto"] = engine.calibration
    host_embed = torch.nn.Embedding.from_pretrained(engine.model.get_input_embeddings().weight.detach().cpu())
    build_trace, held_trace = subset(trace, build), subset(trace, held)

    engine.reconfigure("lru", budgets[0], miss_compute="gpu", prefetch_issue="inflight")
    serve(engine, replay, calib)
    _, lru_host = measured_host_costs(engine, None)     # the reference of every policy's host costs

    # histories, learned once (budget-independent) from the build part, engine and simulator alike
    opts_of, sim_opts_of, sim_kw_of, host_costs, host_timing = {}, {}, {}, {}, {}
    for v in variants:
        policy, label = v.policy, v.label
        opts, sim_opts, sim_kw = dict(v.options), dict(v.options), {}
        if policy in ("finemoe", "moe-infinity"):
            key = "map_store" if policy == "finemoe" else "collection"
            path = os.path.join(stores, f"{label.replace('/', '_')}.safetensors")
            sim_path = os.path.join(stores, f"sim-{label.replace('/', '_')}.safetensors")
            learn = opts | {key: path, "learn": True} | ({"fresh": True} if policy == "finemoe" else {})
            engine.reconfigure(policy, budgets[0], learn, miss_compute="gpu", prefetch_issue="inflight")
            serve(engine, replay, build)
            opts = opts | {key: path, "learn": False}
            if args.simulate:
                sim_kw = {"embed": host_embed} if policy == "finemoe" else {}
                sim_learn = sim_opts | {key: sim_path, "learn": True} | ({"fresh": True} if policy == "finemoe" else {})
                Replay(build_trace, policy, budgets[0], CostModel(engine.geometry.expert_bytes), sim_learn,
                       **sim_kw).run()
                sim_opts = sim_opts | {key: sim_path, "learn": False}
        elif policy == "oracle":
            opts = opts | {"trace": trace}
            sim_opts = dict(opts)
        engine.reconfigure(policy, budgets[0], opts, miss_compute="gpu", prefetch_issue="inflight")
        serve(engine, replay, calib)
        opts_of[label], sim_opts_of[label], sim_kw_of[label] = opts, sim_opts, sim_kw
        host_costs[label], host_timing[label] = measured_host_costs(engine, lru_host)

    rows = []
    for budget in budgets:
        for v in variants:
            policy, label = v.policy, v.label
            for issue in issues[:1] if policy in NON_PREDICTING else issues:
                gpu_row = None
                for mode in modes:
                    for dtype in (dtypes if mode != "gpu" else [None]):
                        engine.reconfigure(policy, budget, opts_of[label], miss_compute=mode, prefetch_issue=issue,
                                           cpu_expert_dtype=dtype)
                        cpu_half = engine.runtime.cpu_misses
                        mc = cpu_half.costs if cpu_half is not None else engine.calibration.costs   # as the row starts
                        scale_start = cpu_half.scale if cpu_half is not None else None
                        keep = len(modes) > 1
                        with host_profile(args.profile, f"{label}-{budget}-{issue}-{mode}-{dtype or ''}"):
                            reqs, logits = serve(engine, replay, held, keep=keep)
                        s = engine.summary(reqs)
                        tokens = s["output_tokens"]
                        row = {"policy": label, "policy_name": policy, "policy_options": v.options,
                               "budget": budget, "prefetch_issue": issue, "mode": mode,
                               "cpu_dtype_choice": dtype,
                               "cpu_expert_dtype": s.get("cpu_expert_dtype") if mode != "gpu" else None,
                               "cpu_kernel": s.get("cpu_kernel") if mode != "gpu" else None,
                               "tpot_s": s["tpot_s"], "ttft_s": s["ttft_s"], "hit_rate": s["hit_rate"],
                               "hits": s["hits"], "misses": s["misses"], "bytes_per_token": s["bytes_per_token"],
                               "prefetch_copies": s["prefetch_copies"], "wasted_prefetches": s["wasted_prefetches"],
                               "cpu_experts_per_token": s["cpu_experts"] / tokens if tokens else 0.0,
                               "cpu_start_ms_per_token": 1e3 * s.get("cpu_half_start_s", 0.0) / tokens,
                               "cpu_wait_ms_per_token": 1e3 * s.get("cpu_half_wait_s", 0.0) / tokens,
                               "cpu_compute_ms_per_token": 1e3 * s.get("cpu_half_compute_s", 0.0) / tokens,
                               "cpu_cost_scale_start": scale_start,
                               "cpu_cost_scale_end": s["cpu_cost_scale"] if cpu_half is not None else None,
                               "decode_path": s["decode_path"]}
                        if mode == "gpu":
                            gpu_row = (reqs, logits)
                        elif keep:
                            row.update(agreement(gpu_row[0], reqs, gpu_row[1], logits))
                        if args.simulate:
                            hc = host_costs[label]
                            cost = CostModel(engine.geometry.expert_bytes, engine.geometry.expert_bytes / mc.copy_s,
                                             layer_time, host_layer + hc.serial_layer_s, hc.overlap_layer_s,
                                             mc.cpu_s, mc.cpu_token_s, mc.cpu_fixed_s, hc.iteration_s)
                            sim = Replay(held_trace, policy, budget, cost, sim_opts_of[label],
                                         miss_compute=mode, issue=PrefetchIssue(issue), **sim_kw_of[label]).run()
                            row.update(sim_tpot_s=sim["tpot_s"], sim_hit_rate=sim["hit_rate"],
                                       sim_bytes_per_token=sim["bytes_per_token"],
                                       sim_error=sim["tpot_s"] / row["tpot_s"] - 1)
                        rows.append(row)
                        print(f"  {label} {budget} {issue} {mode} {row['cpu_expert_dtype'] or ''}: "
                              f"TPOT {row['tpot_s'] * 1e3:.2f} ms hit {row['hit_rate']:.3f}", flush=True)
    engine.reconfigure("lru", budgets[0], miss_compute="gpu")
    cuda = engine.device.type == "cuda"
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(), "trace": args.trace,
              "layers": L, "build_requests": len(build), "eval_requests": len(held),
              "calibration_requests": len(calib), "layer_time_ms": layer_time * 1e3, "host_layer_ms": host_layer * 1e3,
              "policy_layer_ms": {p: c.overlap_layer_s * 1e3 for p, c in host_costs.items()},
              "policy_serial_layer_ms": {p: c.serial_layer_s * 1e3 for p, c in host_costs.items()},
              "policy_iteration_ms": {p: c.iteration_s * 1e3 for p, c in host_costs.items()},
              "host_timing_lru": lru_host, "host_timing": host_timing,
              "calibrations": {d: {"costs": dataclasses.asdict(c.costs), "cpu_dtype": str(c.cpu_dtype),
                                   "cpu_kernel": c.kernel, "kt_error": c.kt_error, "kt_skipped": c.kt_skipped,
                                   "cpu_ms_by_kernel": {k: {str(t): s * 1e3 for t, s in v.items()}
                                                        for k, v in c.cpu_s_by_kernel.items()},
                                   "cpu_ms_by_dtype": {k: {str(t): s * 1e3 for t, s in v.items()}
                                                       for k, v in c.cpu_s_by_dtype.items()}}
                               for d, c in calibrations.items()},
              "expert_bytes": engine.geometry.expert_bytes, "rows": rows, "wall_s": time.perf_counter() - t_all}
    engine.close()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']}; {L} layers; {len(held)} held-out requests, batch 1; "
          f"{result['cpu_threads']} CPU threads; layer {layer_time * 1e3:.3f} ms, host {host_layer * 1e3:.3f} ms")
    print("host ms before compute / beside compute per layer, policy per iteration (gpu, calibration requests): "
          + "; ".join(f"{p} " + "/".join(f"{v:.3f}" for v in t.values()) for p, t in
                      {"lru (reference)": lru_host, **host_timing}.items()))
    for d, c in calibrations.items():
        print(f"--cpu-expert-dtype {d}: " + "; ".join(
            f"{k} " + ", ".join(f"{t} tok {s * 1e3:.3f}" for t, s in v.items()) for k, v in c.cpu_s_by_dtype.items())
            + f" ms -> {calibration.describe(c, result['cpu_threads'])}")
    print(f"{'policy':13s} {'budget':>6s} {'issue':8s} {'mode':5s} {'dtype':15s} {'TPOT ms':>8s} {'TTFT ms':>8s} "
          f"{'hit':>6s} {'MB/tok':>7s} {'cpu/tok':>7s} {'CPU start/wait/compute ms/tok':>29s} {'agree':>6s} "
          f"{'max err':>8s} {'sim ms':>7s} {'sim err':>7s}")
    for r in rows:
        agree = f"{r['token_agreement']:6.3f}" if "token_agreement" in r else f"{'-':>6s}"
        cpu_half = "/".join(f"{r[f'cpu_{k}_ms_per_token']:.2f}" for k in ("start", "wait", "compute"))
        err = f"{r['max_rel_logit_error']:8.1e}" if "max_rel_logit_error" in r else f"{'-':>8s}"
        sim = (f"{r['sim_tpot_s'] * 1e3:7.2f} {100 * r['sim_error']:6.1f}%" if "sim_tpot_s" in r
               else f"{'-':>7s} {'-':>7s}")
        print(f"{r['policy']:13s} {r['budget']:>6s} {r['prefetch_issue']:8s} {r['mode']:5s} "
              f"{dtype_label(r):15s} {r['tpot_s'] * 1e3:8.2f} {r['ttft_s'] * 1e3:8.1f} "
              f"{r['hit_rate']:6.3f} {r['bytes_per_token'] / 1e6:7.1f} {r['cpu_experts_per_token']:7.2f} "
              f"{cpu_half:>29s} {agree} {err} {sim}")
    return result


if __name__ == "__main__":
    main()

"""docs/BENCHMARKS.md, "Zero-copy against copy-then-compute": serve a missed expert by copying it into a device slot
first, or read it straight from pinned host memory (zero-copy, at PCIe speed) while its copy into a slot proceeds for
the next token. Compares both.

Qwen1.5-MoE-A2.7B expert (fused gate_up_proj [2*1408, 2048], gate rows first; down_proj [2048, 1408]; bf16:
17,301,504 bytes), held as HostExpertStore holds a layer: a host tensor [pool, *shape] per weight name, page-locked
in place with cudaHostRegister. Reps take experts in a round over a pool of 64, so an expert returns only after
63 others and the 50 MB L2 hides no PCIe read. A row is M decode rows routed to 1 or 4 missed experts of a layer:
  copy_then_compute  H2D copies into slots on a side stream, an event per expert; compute waits, then the MLP
  zero_copy          the MLP reads the weights through the device-mapped host memory, no copy
  zero_copy+copy     zero_copy while the copy into slots runs on the side stream (the read serves this token,
                     the copy the next); span `result`: output ready, span `both`: output ready and copy landed
  resident           weights already in device memory;  h2d_copy: the copies alone (pinned bandwidth)
Times: CUDA events from issue to result, median of --reps after --warmup. A spin kernel holds both streams until
the host has issued the whole rep, so times exclude host launch gaps (as under CUDA graphs); each row's
`max_issue_ms` against `spin_ms` shows the spin covered the issuing.

    PYTHONPATH=src:benchmarks python3 benchmarks/zero_copy_miss.py --out $OUT/zero_copy.json
    PYTHONPATH=src:benchmarks python3 benchmarks/zero_copy_miss.py --dry-run   # CPU, tiny shapes, no timing claims
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from finemoe.models.random_shapes import qwen15_moe_a27b
from zero_copy_parts import DOWN, DTYPE, GU, ExpertPool, Timeline, ZeroCopyError, check_alias, expert_mlp

TINY = {"hidden": 128, "inter": 64, "pool": 8, "reps": 3, "warmup": 1}   # --dry-run: checks code paths only


def copy_into_slots(tl: Timeline, w: ExpertPool, slots: dict, experts: list[int]) -> list:
    """Issue expert j's H2D copies into slot j on the side stream; one completion mark per expert."""
    done = []
    with torch.cuda.stream(tl.side) if tl.cuda else contextlib.nullcontext():
        for j, e in enumerate(experts):
            for n, slot in slots.items():
                slot[j].copy_(w.host[n][e], non_blocking=True)
            done.append(tl.mark(tl.side))
    return done


def mlps(x: torch.Tensor, weights: dict, experts) -> list[torch.Tensor]:
    return [expert_mlp(x, weights[GU][e], weights[DOWN][e]) for e in experts]   # each [M, H]


# A method runs after Timeline.start() and returns (outputs, {span: end mark}).
def copy_then_compute(tl, w, slots, experts, x):
    out = []
    for j, copied in enumerate(copy_into_slots(tl, w, slots, experts)):
        tl.wait(None, copied)
        out += mlps(x, slots, [j])
    return out, {"result": tl.mark()}


def zero_copy(tl, w, slots, experts, x):
    return mlps(x, w.mapped, experts), {"result": tl.mark()}


def zero_copy_while_copying(tl, w, slots, experts, x):
    copied = copy_into_slots(tl, w, slots, experts)
    out = mlps(x, w.mapped, experts)
    result = tl.mark()
    for c in copied:
        tl.wait(None, c)
    return out, {"result": result, "both": tl.mark()}


def resident(tl, w, slots, experts, x):
    return mlps(x, w.resident, experts), {"result": tl.mark()}


def h2d_copy(tl, w, slots, experts, x):
    return [], {"result": copy_into_slots(tl, w, slots, experts)[-1]}


METHODS = {"copy_then_compute": copy_then_compute, "zero_copy": zero_copy, "zero_copy+copy": zero_copy_while_copying,
           "resident": resident}


def check_outputs(tl: Timeline, w: ExpertPool, slots: dict, x: torch.Tensor, experts: list[int]) -> list[dict]:
    """Each method's outputs against resident's: the same bf16 kernels on the same values, so equal (or off in the
    last bits if cuBLAS picks other kernels for host-mapped operands). A gross difference means other weights."""
    tl.start()
    ref, _ = resident(tl, w, slots, experts, x)
    rows = []
    for name in ("copy_then_compute", "zero_copy", "zero_copy+copy"):
        tl.start()
        out, _ = METHODS[name](tl, w, slots, experts, x)
        tl.sync()
        diff = max(float((o.float() - r.float()).abs().max()) for o, r in zip(out, ref))
        scale = max(float(r.float().abs().max()) for r in ref)
        if diff > 0.05 * scale:
            raise ZeroCopyError(f"{name} (M={x.shape[0]}, experts {experts}) differs from resident by {diff} "
                                f"(outputs up to {scale}): it computed on other weights")
        rows.append({"method": name, "m": x.shape[0], "experts": len(experts), "exact": diff == 0.0,
                     "max_abs_diff": diff})
    return rows


def time_method(tl: Timeline, fn, w, slots, cycle, n: int, x, reps: int, warmup: int) -> dict[str, list[float]]:
    """Per span, the rep times in ms, each rep on the next `n` experts of `cycle`; '_issue': host issue times."""
    times: dict[str, list[float]] = {"_issue": []}
    for r in range(warmup + reps):
        experts = [next(cycle) for _ in range(n)]
        tl.sync()
        tl.hold()
        t0 = time.perf_counter()
        start = tl.start()
        _, ends = fn(tl, w, slots, experts, x)
        issue_ms = (time.perf_counter() - t0) * 1e3
        tl.sync()
        if r >= warmup:
            times["_issue"].append(issue_ms)
            for span, end in ends.items():
                times.setdefault(span, []).append(tl.elapsed_ms(start, end))
    return times


def rows_of(method: str, m, n: int, times: dict, expert_bytes: int) -> list[dict]:
    rows = []
    for span, ms in times.items():
        if span != "_issue":
            med = float(np.median(ms))
            rows.append({"method": method, "span": span, "m": m, "experts": n, "median_ms": med, "reps": len(ms),
                         "p10_ms": float(np.percentile(ms, 10)), "p90_ms": float(np.percentile(ms, 90)),
                         "gbps": n * expert_bytes / (med / 1e3) / 1e9 if med > 0 else None,
                         "max_issue_ms": max(times["_issue"])})
    return rows


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@torch.inference_mode()
def run(args: argparse.Namespace) -> dict:
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        raise ZeroCopyError("no CUDA device: run this on a GPU, or pass --dry-run (CPU, tiny shapes)")
    cfg = qwen15_moe_a27b(1)
    hidden, inter = (cfg.hidden_size, cfg.moe_intermediate_size) if cuda else (TINY["hidden"], TINY["inter"])
    pool, reps, warmup = (args.pool, args.reps, args.warmup) if cuda else (TINY["pool"], TINY["reps"], TINY["warmup"])
    if pool < max(args.experts):
        raise ZeroCopyError(f"--pool {pool} is smaller than --experts {max(args.experts)}")
    device = torch.device("cuda" if cuda else "cpu")
    w = ExpertPool(hidden, inter, pool, device)
    try:
        tl = Timeline(cuda)
        alias = {n: check_alias(w.host[n], w.mapped[n], tl.sync) for n in w.host}
        if not all(torch.equal(w.mapped[n], w.resident[n]) for n in w.host):
            raise ZeroCopyError("the device-mapped host experts differ from their device copies")
        slots = {n: torch.zeros((max(args.experts), *t.shape[1:]), dtype=DTYPE, device=device)   # [4, *shape]
                 for n, t in w.host.items()}
        g = torch.Generator(device=device).manual_seed(1)
        xs = {m: torch.randn((m, hidden), generator=g, device=device).to(DTYPE) for m in args.m}
        checks = [c for n in args.experts for m in args.m for c in check_outputs(tl, w, slots, xs[m], list(range(n)))]
        cycle, rows = itertools.cycle(range(pool)), []                 # an expert returns after pool-1 others
        for n in args.experts:
            rows += rows_of("h2d_copy", None, n, time_method(tl, h2d_copy, w, slots, cycle, n, None, reps, warmup),
                            w.expert_bytes)
            for m in args.m:
                for name, fn in METHODS.items():
                    times = time_method(tl, fn, w, slots, cycle, n, xs[m], reps, warmup)
                    rows += rows_of(name, m, n, times, w.expert_bytes)
    finally:
        w.close()
    return {"issue": 7, "dry_run": not cuda, "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
            "torch": torch.__version__, "commit": commit(), "hidden": hidden, "expert_intermediate": inter,
            "dtype": str(DTYPE), "expert_bytes": w.expert_bytes, "pool_experts": pool, "reps": reps, "warmup": warmup,
            "pinning": "cudaHostRegister in place, as HostExpertStore" if cuda else "none (CPU)",
            "spin_ms": tl.spin_ms, "alias_check": alias, "correctness": checks, "rows": rows}


def table(result: dict) -> str:
    lines = [f"{'method':18s} {'span':6s} {'M':>3s} {'experts':>7s} {'median ms':>10s} {'GB/s':>7s}"]
    for r in result["rows"]:
        gbps = f"{r['gbps']:7.1f}" if r["gbps"] is not None else f"{'-':>7s}"
        lines.append(f"{r['method']:18s} {r['span']:6s} {r['m'] or '-':>3} {r['experts']:7d} "
                     f"{r['median_ms']:10.3f} {gbps}")
    late = sum(r["max_issue_ms"] > result["spin_ms"] > 0 for r in result["rows"])
    if late:
        lines.append(f"note: issuing {late} rows outlasted the {result['spin_ms']:.2f} ms spin (launch gaps included)")
    if result["dry_run"]:
        lines.append("DRY RUN (CPU, tiny shapes): these times say nothing about the GPU methods")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the full results as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the math paths and the JSON")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16], help="decode rows routed to the missed experts")
    ap.add_argument("--experts", type=int, nargs="+", default=[1, 4], help="missed experts of one layer")
    ap.add_argument("--pool", type=int, default=64, help="distinct experts cycled through (>= 64 defeats the L2)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - t0
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    print(f"{result['device']}, torch {result['torch']}, commit {result['commit']}, "
          f"{result['expert_bytes']} bytes/expert, {result['wall_s']:.1f} s")
    print(table(result))
    return result


if __name__ == "__main__":
    main()

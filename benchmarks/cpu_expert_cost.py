"""What a miss costs each way on this host: copying one expert to the GPU against computing it on the CPU.

For one expert of a given shape (default Qwen1.5-MoE-A2.7B: hidden 2048, expert intermediate 1408, bf16,
17.3 MB) it measures, with seeded random weights:
  - the pinned host-to-device copy of one expert (CUDA events; alone, and 8 back to back);
  - the expert's MLP on the CPU (silu(x Wg) * (x Wu) Wd) for 1, 4 and 16 tokens, weights in bf16 and fp32,
    at several torch thread counts (wall time, median);
  - both at once: 8 copies on a copy stream while the CPU computes 8 experts, against each alone, with bf16 and
    with fp32 CPU weights: the wall time of both, and the copies' own time on the copy stream (CUDA events) while
    the CPU computes beside them, against alone (how much the CPU's reads of host memory slow the copies: the
    simulator assumes they do not, simulator/timed_kernels.py cpu_half).
Prints a short table last; `--out FILE` writes every number as JSON. Needs a CUDA device.

    PYTHONPATH=src python3 benchmarks/cpu_expert_cost.py --out $OUT/cpu_expert_cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading

import torch
import torch.nn.functional as F

from benchmarks_common import median_seconds


def expert_weights(hidden: int, inter: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """One expert's host tensors: gate_up [2I, H] and down [H, I] (transformers v5's fused layout)."""
    g = torch.Generator().manual_seed(seed)
    return {"gate_up": (torch.randn(2 * inter, hidden, generator=g) * 0.02).to(dtype),
            "down": (torch.randn(hidden, inter, generator=g) * 0.02).to(dtype)}


def expert_mlp(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [T, H] -> [T, H]: silu(gate) * up, then down (the Qwen/Mixtral expert)."""
    gate, up = F.linear(x, w["gate_up"]).chunk(2, dim=-1)     # [T, I] each
    return F.linear(F.silu(gate) * up, w["down"])             # [T, H]


def pinned_copy(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.pin_memory() for k, v in src.items()}


def copy_times(host: list[dict[str, torch.Tensor]], stream: torch.cuda.Stream, repeat: int) -> dict[str, float]:
    """Median seconds to copy one expert, and 8 experts back to back, host -> device on `stream`."""
    dev = [{k: torch.empty_like(v, device="cuda") for k, v in h.items()} for h in host]

    def copy(n: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            for i in range(n):
                for k in host[i]:
                    dev[i][k].copy_(host[i][k], non_blocking=True)
            end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    out = {}
    for n in (1, 8):
        for _ in range(3):
            copy(n)
        out[f"copy_{n}_s"] = statistics.median(copy(n) for _ in range(repeat))
    return out


def overlap(host: list[dict[str, torch.Tensor]], cpu_w: list[dict[str, torch.Tensor]], threads: int,
            stream: torch.cuda.Stream, repeat: int) -> dict[str, float]:
    """8 copies alone, 8 one-token CPU experts alone, and both at once (wall seconds, medians); and the copies' own
    time on the copy stream (CUDA events), alone and while the CPU computes."""
    dev = [{k: torch.empty_like(v, device="cuda") for k, v in h.items()} for h in host]
    x = torch.randn(1, cpu_w[0]["down"].shape[0], dtype=cpu_w[0]["down"].dtype)
    copy_s: list[float] = []

    def copies():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            for h, d in zip(host, dev):
                for k in h:
                    d[k].copy_(h[k], non_blocking=True)
            end.record(stream)
        stream.synchronize()
        copy_s.append(start.elapsed_time(end) / 1e3)

    def computes():
        for w in cpu_w:
            expert_mlp(x, w)

    def both():
        t = threading.Thread(target=copies)
        t.start()
        computes()
        t.join()

    torch.set_num_threads(threads)
    copies_only = median_seconds(copies, repeat)
    alone = statistics.median(copy_s[1:])
    copy_s.clear()
    both_s = median_seconds(both, repeat)
    return {"copies_only_s": copies_only, "cpu_only_s": median_seconds(computes, repeat), "both_s": both_s,
            "copy_stream_alone_s": alone, "copy_stream_beside_cpu_s": statistics.median(copy_s[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--threads", default="")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cpu_expert_cost.py needs a CUDA device (it compares host-to-device copies with CPU compute)")
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, 2, 4, 8, cores // 2, cores})
    tokens = [int(t) for t in args.tokens.split(",")]
    bf16 = [expert_weights(args.hidden, args.inter, torch.bfloat16, seed) for seed in range(8)]
    expert_bytes = sum(v.numel() * v.element_size() for v in bf16[0].values())
    stream = torch.cuda.Stream()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cpu_count": cores,
              "hidden": args.hidden, "inter": args.inter, "expert_bytes": expert_bytes}
    result.update(copy_times([pinned_copy(w) for w in bf16], stream, args.repeat))
    cpu = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        w = {k: v.to(dtype) for k, v in bf16[0].items()}
        for n in threads:
            torch.set_num_threads(n)
            for t in tokens:
                x = torch.randn(t, args.hidden, dtype=dtype)
                cpu[f"{name}/threads{n}/tokens{t}"] = median_seconds(lambda x=x, w=w: expert_mlp(x, w), args.repeat)
    result["cpu_s"] = cpu
    best = {}
    for name in ("bf16", "fp32"):
        for t in tokens:
            n = min(threads, key=lambda n: cpu[f"{name}/threads{n}/tokens{t}"])
            best[f"{name}/tokens{t}"] = {"threads": n, "s": cpu[f"{name}/threads{n}/tokens{t}"]}
    result["best_cpu"] = best
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        n = best[f"{name}/tokens1"]["threads"]
        result[f"overlap_{name}"] = dict(overlap([pinned_copy(w) for w in bf16], [{k: v.to(dtype) for k, v in w.items()}
                                                                                  for w in bf16], n, stream,
                                                 args.repeat), threads=n)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{result['device']}, torch {result['torch']}, {cores} cores; expert {expert_bytes / 1e6:.1f} MB")
    print(f"copy one expert  {result['copy_1_s'] * 1e3:.3f} ms   (8 back to back: "
          f"{result['copy_8_s'] / 8 * 1e3:.3f} ms each, {expert_bytes * 8 / result['copy_8_s'] / 1e9:.1f} GB/s)")
    print("CPU compute of one expert (ms, best thread count in brackets):")
    for t in tokens:
        b, f = best[f"bf16/tokens{t}"], best[f"fp32/tokens{t}"]
        print(f"  {t:3d} tokens   bf16 {b['s'] * 1e3:7.3f} ({b['threads']:2d})"
              f"   fp32 {f['s'] * 1e3:7.3f} ({f['threads']:2d})")
    for name in ("bf16", "fp32"):
        o = result[f"overlap_{name}"]
        print(f"8 copies {o['copies_only_s'] * 1e3:.2f} ms, 8 {name} CPU experts {o['cpu_only_s'] * 1e3:.2f} ms "
              f"({o['threads']} threads), both at once {o['both_s'] * 1e3:.2f} ms; the copies on their stream "
              f"{o['copy_stream_alone_s'] * 1e3:.2f} ms alone, {o['copy_stream_beside_cpu_s'] * 1e3:.2f} ms beside "
              "the CPU")


if __name__ == "__main__":
    main()

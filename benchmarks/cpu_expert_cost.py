"""What a miss costs each way on this host: copying one expert to the GPU against computing it on the CPU, for every
CPU kernel the engine can use (`--cpu-kernel`, experts/cpu_kernel.py) and a few plain-torch alternatives.

For experts of a given shape (default Qwen1.5-MoE-A2.7B: hidden 2048, expert intermediate 1408, SwiGLU, bf16
17.3 MB each; seeded random weights) it measures:
  - the pinned host-to-device copy of one expert (CUDA events; alone, and 8 back to back);
  - one expert on the CPU, cold (each call a different expert, cycling through --experts of them, by default enough
    for twice the last-level cache), for 1, 4 and 16 tokens at each --threads count (wall time, median), with
        torch-bf16, torch-fp32   the engine's torch kernel (the model's eager experts function) in that weight dtype
        torch-fp16               the same in fp16 (a plain-torch alternative)
        torch-bf16-nomkldnn      bf16 with oneDNN off (torch's own bf16 kernels; a plain-torch alternative)
        kt-kernel-bf16           kTransformers' BF16 MoE kernel (experts/kt_experts.py), when kt_kernel imports;
                                 its own pool of that many threads
  - both at once: 8 copies on a copy stream while the fastest kernel computes 8 one-token experts, and the copies' own
    time on their stream (CUDA events) alone and beside the CPU (whether the CPU's reads of host memory slow them).
Prints a short table last; `--out FILE` writes every number as JSON, with the CPU model, cache and ISA flags.
On the GPU host (no package index) kt-kernel comes from benchmarks/prepare_kt_kernel.py's folder:

    PYTHONPATH=src:benchmarks:.carry python3 benchmarks/cpu_expert_cost.py --threads 1,4,8,16 --out $OUT/cost.json

`--device cpu --tiny` is the smoke mode (tiny shapes, no copies; tests/test_cpu_expert_cost_script.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import subprocess
import threading
import time

import torch

from benchmarks_common import device_name, median_seconds, write_json
from finemoe.errors import ConfigError
from finemoe.experts.cpu_kernel import TorchKernel, relative_error

FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx512_fp16",
         "avx2", "fma")
TORCH_KERNELS = {"torch-bf16": (torch.bfloat16, True), "torch-fp32": (torch.float32, True),
                 "torch-fp16": (torch.float16, True), "torch-bf16-nomkldnn": (torch.bfloat16, False)}


def cpu_info() -> dict:
    """lscpu's model name, last-level cache, cores, NUMA nodes and the ISA flags of interest."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("Flags", "").split())
    return {"model_name": fields.get("Model name"), "l3": fields.get("L3 cache"), "cpus": os.cpu_count(),
            "numa_nodes": fields.get("NUMA node(s)"), "flags": {f: f in flags for f in FLAGS}}


def l3_bytes(l3: str | None) -> int:
    """'300 MiB (1 instance)' -> bytes (0 when unknown)."""
    try:
        number, unit = l3.split()[:2]
        return int(float(number) * {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit])
    except (AttributeError, ValueError, KeyError):
        return 0


def swiglu_experts(num: int, hidden: int, inter: int):
    """A Qwen2-MoE experts module and its bf16 weights {gate_up_proj [E, 2I, H], down_proj [E, H, I]}."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    config = type("Config", (), dict(num_experts=num, hidden_size=hidden, moe_intermediate_size=inter,
                                     hidden_act="silu"))()
    g = torch.Generator().manual_seed(0)
    weights = {"gate_up_proj": (torch.randn(num, 2 * inter, hidden, generator=g) * 0.02).to(torch.bfloat16),
               "down_proj": (torch.randn(num, hidden, inter, generator=g) * 0.02).to(torch.bfloat16)}
    return Qwen2MoeExperts(config), weights


def cold_seconds(kernel, num: int, hidden: int, tokens: int, repeat: int) -> float:
    """Median wall seconds of one expert for `tokens` tokens, each call the next of `num` experts (cold)."""
    x = torch.randn(tokens, hidden)                                       # [t, H]
    w = torch.ones(tokens, 1)                                             # [t, 1]
    times = []
    for i in range(repeat + 2):
        idx = torch.full((tokens, 1), (i * 7) % num, dtype=torch.int64)   # 7 is prime to num unless num % 7 == 0
        t0 = time.perf_counter()
        kernel.compute(0, x, idx, w)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


class NoMkldnn:
    """A torch kernel run with oneDNN off."""

    def __init__(self, kernel: TorchKernel) -> None:
        self.kernel, self.name = kernel, kernel.name + "-nomkldnn"

    def compute(self, *args):
        with torch.backends.mkldnn.flags(enabled=False):
            return self.kernel.compute(*args)


def torch_kernels(experts, weights) -> dict:
    out = {}
    for name, (dtype, mkldnn) in TORCH_KERNELS.items():
        kernel = TorchKernel([experts], [{k: v.to(dtype) for k, v in weights.items()}], dtype)
        out[name] = kernel if mkldnn else NoMkldnn(kernel)
    return out


def copy_times(weights: dict, repeat: int) -> dict[str, float]:
    """Median seconds to copy one expert, and 8 back to back, host (pinned) -> device on a side stream."""
    n = min(8, weights["down_proj"].shape[0])
    host = [{k: v[i].pin_memory() for k, v in weights.items()} for i in range(n)]
    dev = [{k: torch.empty_like(v, device="cuda") for k, v in h.items()} for h in host]
    stream = torch.cuda.Stream()

    def copy(m: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            for i in range(m):
                for k in host[i]:
                    dev[i][k].copy_(host[i][k], non_blocking=True)
            end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    out = {}
    for m in (1, n):
        for _ in range(3):
            copy(m)
        out[f"copy_{m}_s"] = statistics.median(copy(m) for _ in range(repeat))
    out["copies_back_to_back"] = n
    return out, host, dev, stream


def overlap(kernel, num: int, hidden: int, host, dev, stream, repeat: int) -> dict[str, float]:
    """len(host) copies alone, as many one-token CPU experts alone, and both at once (wall seconds, medians); and the
    copies' own time on their stream (CUDA events), alone and while the CPU computes beside them (whether the CPU's
    reads of host memory slow the copies: the simulator assumes they do not, simulator/timed_kernels.py cpu_half)."""
    x, w = torch.randn(1, hidden), torch.ones(1, 1)
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
        for i in range(len(host)):
            kernel.compute(0, x, torch.full((1, 1), (i * 7) % num, dtype=torch.int64), w)

    def both():
        t = threading.Thread(target=copies)
        t.start()
        computes()
        t.join()

    def med(fn):
        return median_seconds(fn, repeat)
    copies_only = med(copies)
    alone = statistics.median(copy_s[1:])
    copy_s.clear()
    both_s = med(both)
    return {"copies_only_s": copies_only, "cpu_only_s": med(computes), "both_s": both_s,
            "copy_stream_alone_s": alone, "copy_stream_beside_cpu_s": statistics.median(copy_s[1:])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--experts", type=int, default=0, help="experts cycled (default: 2x the L3 cache, 8 at least)")
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--threads", default="", help="default: 1,4,8,16 up to the core count")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: no copies (smoke runs)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, 4 experts, 3 repeats (smoke runs)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.tiny:
        args.hidden, args.inter, args.experts, args.repeat = 64, 32, 4, 3
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cpu_expert_cost.py: no CUDA device; pass --device cpu to measure the CPU kernels alone")
    cpu = cpu_info()
    cores = os.cpu_count() or 1
    threads = ([int(t) for t in args.threads.split(",")] if args.threads
               else [n for n in (1, 4, 8, 16) if n <= cores] or [1])
    tokens = [int(t) for t in args.tokens.split(",")]
    expert_bytes = 3 * args.hidden * args.inter * 2
    num = args.experts or max(8, math.ceil(2 * l3_bytes(cpu["l3"]) / expert_bytes))
    experts, weights = swiglu_experts(num, args.hidden, args.inter)
    kernels = torch_kernels(experts, weights)
    has_kt = importlib.util.find_spec("kt_kernel") is not None
    result = {"cpu": cpu, "torch": torch.__version__, "hidden": args.hidden, "inter": args.inter,
              "expert_bytes": expert_bytes, "experts_cycled": num, "threads": threads, "tokens": tokens,
              "device": device_name(args.device), "kt_kernel": has_kt}
    copies = None
    if args.device == "cuda":
        times, *copies = copy_times(weights, args.repeat)
        result.update(times)
    cpu_s: dict[str, dict[str, float]] = {}
    reference = TorchKernel([experts], [{k: v.float() for k, v in weights.items()}], torch.float32)
    errors = {}
    for n in threads:
        torch.set_num_threads(n)
        chosen = dict(kernels)
        if has_kt:
            from finemoe.experts.kt_experts import KtKernel

            try:
                chosen["kt-kernel-bf16"] = KtKernel(experts, [weights], n)
            except ConfigError as e:         # installed, but its extension does not load on this host
                result["kt_unavailable"] = str(e)
                print(f"kt-kernel skipped: {e}", flush=True)
                has_kt = False
            if has_kt and "kt_variant" not in result:
                import kt_kernel
                result["kt_variant"] = kt_kernel.__cpu_variant__
        for name, kernel in chosen.items():
            errors.setdefault(name, relative_error(kernel, reference, min(num, 8), args.hidden))
            for t in tokens:
                cpu_s.setdefault(name, {})[f"threads{n}/tokens{t}"] = cold_seconds(kernel, num, args.hidden, t,
                                                                                 args.repeat)
        del kernel
        chosen.clear()      # kt-kernel's pool and its threads go with it, before the next thread count
    result["cpu_s"], result["rel_error_vs_torch_fp32"] = cpu_s, errors
    best = {}
    for name, by in cpu_s.items():
        for t in tokens:
            n = min(threads, key=lambda n: by[f"threads{n}/tokens{t}"])
            best[f"{name}/tokens{t}"] = {"threads": n, "s": by[f"threads{n}/tokens{t}"]}
    result["best_cpu"] = best
    fastest = min(cpu_s, key=lambda k: best[f"{k}/tokens{tokens[0]}"]["s"])
    result["fastest_at_tokens" + str(tokens[0])] = fastest
    if copies is not None:
        n = best[f"{fastest}/tokens{tokens[0]}"]["threads"]
        torch.set_num_threads(n)
        kernel = (KtKernel(experts, [weights], n) if fastest.startswith("kt") else kernels[fastest])
        result["overlap"] = dict(overlap(kernel, num, args.hidden, *copies, args.repeat), kernel=fastest, threads=n)
    write_json(args.out, result)
    print(f"{cpu['model_name']}, {cores} CPUs, L3 {cpu['l3']}; "
          f"{', '.join(f for f, on in cpu['flags'].items() if on and f.startswith(('amx', 'avx512_bf16')))}; "
          f"torch {result['torch']}, kt-kernel {'variant ' + result.get('kt_variant', '') if has_kt else 'absent'}")
    print(f"expert {expert_bytes / 1e6:.1f} MB, {num} cycled (cold); device {result['device']}")
    if "copy_1_s" in result:
        m = result["copies_back_to_back"]
        many = result[f"copy_{m}_s"]
        print(f"copy one expert {result['copy_1_s'] * 1e3:.3f} ms ({m} back to back: "
              f"{many / m * 1e3:.3f} ms each, {expert_bytes * m / many / 1e9:.1f} GB/s)")
    if "overlap" in result:
        o = result["overlap"]
        print(f"{m} copies {o['copies_only_s'] * 1e3:.2f} ms, {m} CPU experts {o['cpu_only_s'] * 1e3:.2f} ms "
              f"({o['kernel']}, {o['threads']} threads), both at once {o['both_s'] * 1e3:.2f} ms; the copies on their "
              f"stream {o['copy_stream_alone_s'] * 1e3:.2f} ms alone, {o['copy_stream_beside_cpu_s'] * 1e3:.2f} ms "
              "beside the CPU")
    print("CPU ms per cold expert (threads: " + ",".join(map(str, threads)) + "); best [threads]; rel. error vs fp32")
    header = "kernel".ljust(22) + "".join(f"{f'{t} tok':>10}" for t in tokens) + "   " + "".join(
        f"{f'{n} thr/{tokens[0]} tok':>14}" for n in threads) + "   rel.err"
    print(header)
    for name, by in cpu_s.items():
        cells = "".join(f"{best[f'{name}/tokens{t}']['s'] * 1e3:7.3f} [{best[f'{name}/tokens{t}']['threads']}]"
                        .rjust(10) for t in tokens)
        per_thread = "".join(f"{by[f'threads{n}/tokens{tokens[0]}'] * 1e3:14.3f}" for n in threads)
        print(name.ljust(22) + cells + "   " + per_thread + f"   {errors[name]:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Real MoE shapes offloaded at 25%: TTFT, TPOT next to its copy floor, demand-copy rate against raw pinned,
peak host and device memory, and load time against checkpoint size.

For each `random:NAME` shape (models/random_shapes.py: the published config numbers, seeded random bf16 weights),
in its own process (so the host peak is that shape's):
  serve  the model is built on the CPU with as many layers as --host-gib holds (all where they fit; the table says
         how many), the engine pins its experts and moves the rest to the GPU; then at --budget with each policy,
         one warm-up request and one measured request (--prompt-len random tokens, --new-tokens greedy tokens).
         TPOT's copy floor is the measured request's bytes copied per decode token over the raw pinned rate.
  copy   one layer's experts demanded through the cache (all misses), timed on the copy stream, against a raw
         pinned host-to-device copy of the same bytes in the same process.
  load   a checkpoint of the same shape, cut to the layers that fit --disk-gb, is saved with save_pretrained to
         --ckpt-dir and loaded through finemoe's real loading path (config, safetensors, experts into the pinned
         host store); GB/s = checkpoint bytes / load seconds. The file was just written, so it is read from the
         page cache when the host has the memory: the figure is the loading path's, not the disk's.
Random weights route almost uniformly: this measures the engine at real scale, not prediction.

    PYTHONPATH=src python3 benchmarks/real_shapes_gpu.py --out $OUT/real_shapes.json
    PYTHONPATH=src python3 benchmarks/real_shapes_gpu.py --shapes qwen3-30b-a3b --out $OUT/qwen3.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks_common import Progress, demand_load_gbps
from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine.metrics import peak_host_bytes
from finemoe.models.adapters import find_moe_layers, geometry_of
from finemoe.models.default import default_tokenizer
from finemoe.models.loader import LoadedModel, load_model
from finemoe.models.random_shapes import SHAPES, build_random

DEFAULT_SHAPES = ("qwen3-30b-a3b", "gpt-oss-20b", "mixtral-8x7b", "deepseek-v2-lite", "olmoe-1b-7b", "glm-4.5-air",
                  "qwen3.5-35b-a3b")
TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            vocab_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=16, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, sliding_window=16)
TINY_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts")


def tiny_spec(name: str, layers: int) -> tuple[str, dict]:
    """The shape with small widths and at most 16 experts (the CPU smoke run): (spec, config overrides)."""
    fields = SHAPES[name].fields
    over = {k: v for k, v in TINY.items() if k in fields}
    over.update({k: min(fields[k], 16) for k in TINY_EXPERTS if k in fields})
    if "kv_lora_rank" in fields:   # multi-head latent attention: as many key/value heads as query heads
        over["num_key_value_heads"] = over["num_attention_heads"]
    return f"random:{name}@{layers}", over


def layer_bytes(spec: str, over: dict, dtype: torch.dtype) -> tuple[int, int, int]:
    """(routed-expert bytes per MoE layer, other bytes, MoE layers) of the shape, from a meta skeleton."""
    model = build_random(spec, "meta", dtype, 0, over)[0]
    layers = find_moe_layers(model)
    g = geometry_of(model, layers)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return g.num_experts * g.expert_bytes, total - g.total_bytes, g.num_layers


def fitting_layers(name: str, over: dict, dtype: torch.dtype, limit_bytes: float, tiny_layers: int | None) -> int:
    """The most decoder layers whose weights fit `limit_bytes` (all of them when they fit)."""
    full = tiny_layers or SHAPES[name].layers
    per_layer, other, moe = layer_bytes(f"random:{name}@{full}", over, dtype)
    dense = full - moe
    return max(1 + dense, min(full, int((limit_bytes - other) // per_layer) + dense))


def raw_pinned_gbps(nbytes: int, device: torch.device, reps: int = 5) -> float:
    """Raw pinned host-to-device copy of `nbytes` in one copy (median of reps, after one warm-up)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(reps + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return nbytes / float(np.median(times[1:])) / 1e9


def serve_rows(engine: Engine, args) -> list[dict]:
    vocab = int(engine.model.config.get_text_config().vocab_size)
    ids = torch.randint(2, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    marks: list[int] = []     # bytes copied so far, before each forward of the measured request
    rows = []
    for policy in args.policies.split(","):
        engine.reconfigure(policy, args.budget)
        engine.generate([ids[: max(1, args.prompt_len // 2)]], SamplingParams(max_new_tokens=4, ignore_eos=True))
        marks.clear()
        engine.iteration_hooks.append(lambda it, rows_: marks.append(engine.runtime.totals.bytes_copied))
        req = engine.generate([ids], params)[0]
        engine.iteration_hooks.pop()
        s = engine.summary([req])
        decode_bytes = engine.runtime.totals.bytes_copied - marks[1] if len(marks) > 1 else 0
        rows.append({"policy": policy, "budget": args.budget, "ttft_s": s["ttft_s"], "tpot_s": s["tpot_s"],
                     "hit_rate": s["hit_rate"], "decode_bytes_per_token": decode_bytes / max(req.metrics.tokens - 1, 1),
                     "decode_path": s["decode_path"], "cache_slots": s["cache_slots"]})
    return rows


def load_row(name: str, over: dict, args, dtype: torch.dtype, layers: int) -> dict:
    """Save a checkpoint of `layers` layers under --ckpt-dir and time finemoe's loading path on it."""
    spec = f"random:{name}@{layers}"
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=args.ckpt_dir))
    try:
        model = build_random(spec, "cpu", dtype, 0, over)[0]
        model.save_pretrained(root)
        default_tokenizer().save_pretrained(root)
        del model
        size = sum(f.stat().st_size for f in root.glob("*.safetensors"))
        cfg = EngineConfig(model=str(root), device=args.device, dtype=args.dtype,
                           expert_budget=_min_budget(spec, over, dtype), max_model_len=_context(args),
                           max_batch_size=1, show_progress=False)
        t0 = time.perf_counter()
        loaded = load_model(cfg)                 # config, device map, safetensors (experts to host memory)
        t1 = time.perf_counter()
        engine = Engine(loaded, cfg)             # experts into the pinned host store, the rest to the device
        t2 = time.perf_counter()
        in_place = engine.store.pinned_in_place
        engine.close()
        return {"layers": layers, "checkpoint_bytes": size, "read_s": t1 - t0, "store_and_place_s": t2 - t1,
                "load_s": t2 - t0, "load_GBps": size / (t2 - t0) / 1e9, "tensors_pinned_in_place": in_place}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _context(args) -> int:
    """--max-model-len for the runs: the measured request rounded up to 256 tokens (the KV cache the device
    memory check reserves; the model's own context would reserve tens of GB)."""
    return -(-(args.prompt_len + args.new_tokens) // 256) * 256


def _min_budget(spec: str, over: dict, dtype: torch.dtype) -> int:
    model = build_random(spec, "meta", dtype, 0, over)[0]
    return geometry_of(model, find_moe_layers(model)).min_budget_bytes


def run_shape(name: str, args) -> dict:
    """Everything for one shape, in this process."""
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    tiny_layers = 3 if args.tiny else None
    spec, over = tiny_spec(name, tiny_layers) if args.tiny else (f"random:{name}", {})
    layers = fitting_layers(name, over, dtype, args.host_gib * 2**30, tiny_layers)
    spec = f"random:{name}@{layers}"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    say = Progress(name)
    say(f"building {spec} ({dtype})")
    t0 = time.perf_counter()
    model = build_random(spec, "cpu", dtype, 0, over)[0]
    built_s = time.perf_counter() - t0
    say("built")
    loaded = LoadedModel(model, default_tokenizer(), spec, f"{spec} (random {dtype})")
    engine = Engine(loaded, EngineConfig(device=args.device, dtype=args.dtype, expert_budget=args.budget,
                                         max_model_len=_context(args), max_batch_size=1, show_progress=False))
    pin_s = time.perf_counter() - t0 - built_s
    say("engine started (experts pinned, the rest on the device)")
    g = engine.geometry
    result = {"shape": name, "source": SHAPES[name].source, "layers": layers, "all_layers": tiny_layers or
              SHAPES[name].layers, "moe_layers": g.num_layers, "experts": g.num_experts, "top_k": g.top_k,
              "expert_bytes": g.expert_bytes, "total_expert_bytes": g.total_bytes, "build_s": built_s,
              "pin_and_place_s": pin_s, "tensors_pinned_in_place": engine.store.pinned_in_place,
              "rows": serve_rows(engine, args)}
    say("served: " + ", ".join(f"{r['policy']} TPOT {r['tpot_s'] * 1e3:.1f} ms" for r in result["rows"]))
    if device.type == "cuda":
        result["raw_pinned_GBps"] = raw_pinned_gbps(g.num_experts * g.expert_bytes, device)
        result["demand_copy_GBps"] = demand_load_gbps(engine, 4)
        say(f"copies: demand {result['demand_copy_GBps']:.1f} GB/s, raw pinned {result['raw_pinned_GBps']:.1f} GB/s")
        for row in result["rows"]:
            row["copy_floor_s"] = row["decode_bytes_per_token"] / (result["raw_pinned_GBps"] * 1e9)
    result["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
    engine.close()
    del engine, loaded, model
    disk_layers = fitting_layers(name, over, dtype, args.disk_gb * 1e9, tiny_layers)
    result["load"] = load_row(name, over, args, dtype, disk_layers)
    say(f"load test: {result['load']['load_GBps']:.2f} GB/s")
    result["peak_host_bytes"] = peak_host_bytes()
    return result


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policies", default="lru,finemoe")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--host-gib", type=float, default=100.0, help="weights the serving model may hold in host RAM")
    ap.add_argument("--disk-gb", type=float, default=40.0, help="largest checkpoint the load test saves")
    ap.add_argument("--ckpt-dir", default=None, help="where the load test saves its checkpoint (default: tmp)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, help="bfloat16 (cuda default) or float32 (cpu default)")
    ap.add_argument("--tiny", action="store_true", help="small widths, 3 layers (CPU smoke test of this script)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: run one shape in this process
    ap.add_argument("--out", default=None, help="full JSON here")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    for name in args.shapes.split(","):
        if name not in SHAPES:
            ap.error(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return args


def table(results: list[dict]) -> str:
    lines = [f"{'shape':18s} {'layers':>7s} {'policy':8s} {'TTFT ms':>8s} {'TPOT ms':>8s} {'floor ms':>8s} "
             f"{'copy GB/s':>9s} {'raw GB/s':>8s} {'host GiB':>8s} {'dev GiB':>7s} {'load GB/s':>9s}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['shape']:18s} error: {r['error']}")
            continue
        nan = float("nan")
        for row in r["rows"]:
            lines.append(
                f"{r['shape']:18s} {r['layers']:>3d}/{r['all_layers']:<3d} {row['policy']:8s} "
                f"{row['ttft_s'] * 1e3:8.1f} {row['tpot_s'] * 1e3:8.1f} {row.get('copy_floor_s', nan) * 1e3:8.1f} "
                f"{r.get('demand_copy_GBps', nan):9.1f} {r.get('raw_pinned_GBps', nan):8.1f} "
                f"{r['peak_host_bytes'] / 2**30:8.1f} {r['peak_device_bytes'] / 2**30:7.1f} "
                f"{r['load']['load_GBps']:9.2f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.one:
        result = run_shape(args.one, args)
        Path(args.out).write_text(json.dumps(result))
        return result
    results = []
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for name in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "shape.json"
            cmd = [sys.executable, __file__, *_without(passthrough, "--out", "--shapes"), "--one", name,
                   "--out", str(out)]
            proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)       # its progress lines pass through
            if proc.returncode == 0:
                results.append(json.loads(out.read_text()))
            else:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"shape": name, "error": f"exit {proc.returncode}: {last}"})
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "args": vars(args), "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(results))
    return report


def _without(argv: list[str], *flags: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if not any(a.startswith(f + "=") for f in flags):
            out.append(a)
    return out


if __name__ == "__main__":
    main()

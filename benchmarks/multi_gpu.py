"""Issue 25 on two GPUs: one expert cache over both (`--devices cuda:0,cuda:1`) against one GPU.

A random Qwen1.5-MoE-A2.7B-shaped bf16 model (`random:qwen1.5-moe-a2.7b`, its own random routers) decodes the same
seeded random prompts at batch 1 under `--policy` in four rows: one GPU at `--budget` (25%), one GPU at twice that
(50%), and two GPUs at `--budget` each under both non-expert placements (experts/placement.py; half the slots on
each GPU): `primary` (every layer's weights and compute on cuda:0, an expert resident on cuda:1 reaching cuda:0 by a
peer copy; CUDA graphs) and `split` (the decoder layers in two contiguous ranges, one per GPU, as accelerate's
balanced device map; each layer's experts compute on its own GPU, peer-copied there from the other; eager decode).
Per row: TPOT median, hit rate, host and peer copies per token; then split's TPOT over primary's (what
`--non-expert-placement auto` decides by at start). Then the copy rates: one expert's host (pinned) -> cuda:0 copy
and its cuda:1 -> cuda:0 peer copy, median over `--repeat` copies (GB/s). Greedy tokens of the two-GPU rows must
equal the one-GPU rows' (reported).

Memory is planned as for a user (engine/memory_fit.py): the one-GPU rows run on an engine started with
`--devices cuda:0 --expert-budget BUDGET` (twice the budget is checked against the same plan), the two-GPU rows on
one started with `--devices cuda:0,cuda:1 --expert-budget BUDGET` under the default auto placement, which plans
both placements on both GPUs, times them at start (its choice and timings are reported as `auto_choice`) and
refuses a budget that does not fit either GPU; its rows name their placement with `reconfigure(...,
non_expert_placement=MODE)`, slots capped by each GPU's room as for `--non-expert-placement MODE`. The CPU smoke
run has no memory to plan and no second device (several --devices are GPUs only): its two-device rows are two slot
pools on the CPU, passed as placements.

    PYTHONPATH=src:benchmarks python3 benchmarks/multi_gpu.py --out $OUT/multi_gpu.json
CPU smoke run (the built-in tiny model, two slot pools on the CPU standing in for the GPUs): --device cpu --tiny.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time

import numpy as np
import torch

from finemoe.config import EngineConfig, parse_budget
from finemoe.engine import Engine, SamplingParams, memory_fit

SHAPE = "random:qwen1.5-moe-a2.7b"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_rate(src: torch.Tensor, dst: torch.Tensor, repeat: int) -> float:
    """Bytes/s of dst.copy_(src), median of `repeat` timed copies after one warm-up."""
    times = []
    for i in range(repeat + 1):
        sync(dst.device)
        sync(src.device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(dst.device)
        if i:
            times.append(time.perf_counter() - t0)
    return src.numel() * src.element_size() / float(np.median(times))


def copy_rates(engine: Engine, devices: tuple[str, str], repeat: int) -> dict:
    """One expert's bytes, host (the pinned store) -> devices[0] and devices[1] -> devices[0]."""
    g = engine.geometry
    host = torch.cat([t[0].reshape(-1).view(torch.uint8) for t in engine.store.tensors[0].values()])
    if engine.device.type == "cuda":
        host = host.pin_memory()
    a = torch.empty_like(host, device=devices[0])
    b = torch.empty_like(host, device=devices[1])
    b.copy_(host)
    assert host.numel() == g.expert_bytes
    return {"expert_bytes": g.expert_bytes, "host_copy_Bps": copy_rate(host, a, repeat),
            "peer_copy_Bps": copy_rate(b, a, repeat)}


def run_row(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[dict, list]:
    reqs = engine.generate(prompts, params)
    s = engine.summary(reqs)
    tokens = sum(len(r.output_ids) for r in reqs)
    row = {"tpot_s": s["tpot_s"], "hit_rate": s["hit_rate"], "cache_slots": s["cache_slots"],
           "host_copies_per_token": s.get("host_copies", s["bytes_copied"] / s["expert_bytes"]) / tokens,
           "peer_copies_per_token": s.get("peer_copies", 0) / tokens, "decode_path": engine.decode_path,
           "non_expert_placement": s.get("non_expert_placement"),
           "non_expert_placement_chosen_by": s.get("non_expert_placement_chosen_by"),
           "layer_devices": s.get("layer_devices"), "summary": s}
    return row, [r.output_ids for r in reqs]


def start(args: argparse.Namespace, devices: tuple[str, ...]) -> Engine:
    """The engine a user gets from `--devices DEVICES --expert-budget BUDGET` (GPUs; auto placement on two), or
    the CPU smoke run's one-device engine."""
    where = dict(device="cpu") if args.device == "cpu" else dict(devices=devices)
    return Engine.from_config(EngineConfig(model=None if args.tiny else SHAPE, policy=args.policy,
                                           expert_budget=args.budget, show_progress=False,
                                           warm_up=args.device != "cpu", **where))


def free_device_memory() -> None:
    """After the last reference to a closed engine is dropped: free its device memory, so the next engine's memory
    plan sees it free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def two_device_setting(engine: Engine, mode: str, devices: tuple[str, str], per_device: int) -> dict:
    """`reconfigure` arguments for a two-device row under `mode`: on GPUs the engine's own placement (within its
    memory plan, as `--non-expert-placement MODE`); on the CPU smoke run two slot pools on the CPU."""
    if len(engine.cfg.devices or ()) > 1:
        return dict(non_expert_placement=mode)
    g = engine.geometry
    return dict(placement=engine.placement(mode, devices, min(per_device // g.expert_bytes, g.total_experts)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--budget", default="25%", help="per GPU")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=20, help="timed copies per copy rate")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the built-in tiny model (CPU smoke test of this script)")
    ap.add_argument("--out", default="multi_gpu.json")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    devices = ("cpu", "cpu") if cpu else ("cuda:0", "cuda:1")
    if not cpu and torch.cuda.device_count() < 2:
        raise SystemExit(f"this benchmark needs two GPUs; {torch.cuda.device_count()} visible (use --device cpu "
                         "--tiny for the smoke run)")
    params = SamplingParams(max_new_tokens=args.new_tokens)
    rows, outputs = [], {}

    engine = start(args, devices[:1])
    g = engine.geometry
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, engine.model.config.vocab_size, args.prompt_tokens).tolist()
               for _ in range(args.prompts)]
    budget = parse_budget(args.budget, g.total_bytes)
    memory_fit.resolve_budget(dataclasses.replace(engine.cfg, expert_budget=2 * budget), g, engine.memory_plan)
    for per_device in (budget, 2 * budget):
        engine.reconfigure(args.policy, per_device)
        row, outputs[("1 GPU", per_device)] = run_row(engine, prompts, params)
        rows.append(dict(row, config="1 GPU", budget_per_device=f"{100 * per_device / g.total_bytes:.0f}%"))
    engine.close()
    engine = None
    free_device_memory()

    engine = start(args, devices)
    auto = engine.placement_choice if len(engine.cfg.devices or ()) > 1 else None
    plan = None if engine.memory_plan is None else memory_fit.describe_all(engine.memory_plan)
    for mode in ("primary", "split"):
        label = f"2 GPUs {mode}"
        engine.reconfigure(args.policy, budget, **two_device_setting(engine, mode, devices, budget))
        row, outputs[(label, budget)] = run_row(engine, prompts, params)
        rows.append(dict(row, config=label, budget_per_device=f"{100 * budget / g.total_bytes:.0f}%"))
    one = outputs[("1 GPU", budget)]
    rates = copy_rates(engine, devices, args.repeat)
    by_label = {r["config"]: r for r in rows[2:]}
    result = {"model": "built-in tiny" if args.tiny else SHAPE, "policy": args.policy, "device": args.device,
              "rows": rows, "copy_rates": rates, "memory_plan": plan,
              "auto_choice": None if auto is None else dataclasses.asdict(auto),
              "split_over_primary_tpot": by_label["2 GPUs split"]["tpot_s"] / by_label["2 GPUs primary"]["tpot_s"],
              "two_gpu_tokens_equal_one_gpu": all(outputs[(label, budget)] == one for label in by_label)
              and outputs[("1 GPU", 2 * budget)] == one}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"{'config':14} {'budget/GPU':>10} {'slots':>6} {'TPOT ms':>8} {'hit rate':>8} {'host/tok':>8} "
          f"{'peer/tok':>8}")
    for r in rows:
        print(f"{r['config']:14} {r['budget_per_device']:>10} {r['cache_slots']:>6} {1e3 * r['tpot_s']:8.2f} "
              f"{r['hit_rate']:8.3f} {r['host_copies_per_token']:8.2f} {r['peer_copies_per_token']:8.2f}")
    print(f"split / primary TPOT on two GPUs: {result['split_over_primary_tpot']:.2f}")
    if auto is not None:
        times = ", ".join(f"{m} {1e3 * t:.2f} ms" for m, t in auto.tpot_s.items())
        print(f"--non-expert-placement auto chose {auto.mode} at start, by timing ({times})")
    print(f"copy of one expert ({rates['expert_bytes']} B): host -> {devices[0]} {rates['host_copy_Bps'] / 1e9:.1f} "
          f"GB/s, {devices[1]} -> {devices[0]} {rates['peer_copy_Bps'] / 1e9:.1f} GB/s; two-GPU tokens equal "
          f"one-GPU tokens: {result['two_gpu_tokens_equal_one_gpu']}")
    return result


if __name__ == "__main__":
    main()

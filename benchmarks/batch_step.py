"""A decode step at batch B under an expert budget (issue 22's thrash target): every policy's hit rate, MB copied per
step and step time, with B random prompts of a fixed length (random routing: the model's random weights route almost
uniformly, the case where a step's distinct experts exceed the cache).

Qwen1.5-MoE-A2.7B shapes (60 experts, top-4) with `--layers` layers, seeded random weights; `--tiny` shrinks the
widths (the expert count and top-k stay), for the CPU. On the GPU the step time follows the bytes copied; on the CPU
only the counts mean anything. `--modes gpu,auto` also runs each policy with a share of the misses computed on the
host CPU (--miss-compute auto: approximate; its CPU experts per step are reported). Short table last; JSON to --out.

    PYTHONPATH=src:benchmarks python3 benchmarks/batch_step.py --out $OUT/batch_step.json           # GPU, 24 layers
    PYTHONPATH=src:benchmarks python3 benchmarks/batch_step.py --modes gpu,auto --cpu-threads 8 --out $OUT/b.json
    PYTHONPATH=src:benchmarks python3 benchmarks/batch_step.py --device cpu --tiny --layers 24     # counts only
"""
from __future__ import annotations

import argparse

import torch

from benchmarks_common import build_model, device_name, write_json
from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.eval.variants import parse_variants
from finemoe.models.default import default_tokenizer
from finemoe.models.loader import LoadedModel


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policies", default="lru,lru/order=recency,lfu,finemoe,moe-infinity",
                    help="POLICY[/KEY=VALUE...] variants, comma-separated")
    ap.add_argument("--modes", default="gpu", help="--miss-compute modes per policy, among gpu, cpu, auto (gpu: exact)")
    ap.add_argument("--cpu-threads", type=int, default=None, help="torch CPU threads for cpu/auto rows")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model = build_model(args.layers, 0, args.device, args.tiny)
    engine = Engine(LoadedModel(model, default_tokenizer(), "qwen1.5-moe-shape-random", "Qwen1.5-MoE shape, random"),
                    EngineConfig(device=args.device, policy="resident", max_batch_size=args.batch,
                                 cpu_threads=args.cpu_threads, show_progress=False))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, model.config.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    modes = args.modes.split(",")
    runs = [(v, "gpu") for v in parse_variants("resident")]
    runs += [(v, mode) for v in parse_variants(args.policies) for mode in modes]
    for v, mode in runs:
        budget = None if v.policy == "resident" else args.budget
        engine.reconfigure(v.policy, budget, dict(v.options), miss_compute=mode)
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))     # warm-up
        engine.reconfigure(v.policy, budget, dict(v.options), miss_compute=mode)
        s = engine.summary(engine.generate(prompts, params))
        rows.append({"policy": v.label, "mode": mode, "budget": "100%" if budget is None else args.budget,
                     "cache_slots": s["cache_slots"], "hit_rate": s["hit_rate"],
                     "cpu_experts_per_step": s["cpu_experts"] / max(s["output_tokens"], 1) * args.batch,
                     "mb_per_step": s["bytes_per_token"] * args.batch / 1e6, "step_s": s["tpot_s"]})
        print(f"  {v.label} {mode}: hit {s['hit_rate']:.3f} step {s['tpot_s'] * 1e3:.1f} ms", flush=True)
    engine.close()
    result = {"device": device_name(args.device), "layers": args.layers,
              "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows}
    write_json(args.out, result)
    print(f"\n{result['device']}; {args.layers} layers; batch {args.batch}; {args.prompt_len}-token random prompts; "
          f"{args.new_tokens} new tokens; decode step = TPOT")
    print(f"{'policy':24s} {'mode':>4s} {'budget':>6s} {'slots':>6s} {'hit':>6s} {'MB/step':>8s} {'CPU/step':>8s} "
          f"{'step ms':>8s}")
    for r in rows:
        print(f"{r['policy']:24s} {r['mode']:>4s} {r['budget']:>6s} {r['cache_slots']:6d} {r['hit_rate']:6.3f} "
              f"{r['mb_per_step']:8.1f} {r['cpu_experts_per_step']:8.1f} {r['step_s'] * 1e3:8.1f}")
    return result


if __name__ == "__main__":
    main()

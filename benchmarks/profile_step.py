"""Where does a decode step's time go? Plain transformers (several call styles) vs finemoe resident,
interleaved repeats on one Qwen1.5-MoE-shaped random model, plus a profiler table per variant.

    PYTHONPATH=src python3 benchmarks/profile_step.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks_common import build_model  # noqa: E402  (same folder)
from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.models.default import default_tokenizer
from finemoe.models.loader import LoadedModel


@torch.inference_mode()
def plain_steps(model, ids, n, style: str) -> float:
    """Median decode step (synchronized) for one call style."""
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    pos = torch.tensor([[ids.shape[1] - 1]], device=ids.device)
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        s = time.perf_counter()
        pos = pos + 1
        if style in ("mask+pos", "mask+pos+cachepos"):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            extra = {"cache_position": pos[0]} if style == "mask+pos+cachepos" else {}
            out = model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                        **extra)
        else:
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        int(tok)
        times.append(time.perf_counter() - s)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rounds-only", action="store_true", help="plain call styles only (no profiles, no engine)")
    args = ap.parse_args()
    model = build_model(args.layers, 0, "cuda", False)
    ids = torch.randint(2, 1000, (1, 64), device="cuda")
    res = {}
    from bench_engine import plain_generate_tpot
    for rep in range(args.rounds):
        for style in ("mask+pos", "mask+pos+cachepos", "bare"):
            res.setdefault(f"plain {style}", []).append(plain_steps(model, ids, 24, style))
        res.setdefault("plain generate()", []).append(plain_generate_tpot(model, ids, 24))
    if args.rounds_only:
        for k, v in res.items():
            print(f"{k:24s} " + "  ".join(f"{x * 1e3:7.2f} ms" for x in v))
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        plain_steps(model, ids, 4, "mask+pos")
    with open(os.path.join(args.out, "profile_plain.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    engine = Engine(LoadedModel(model, default_tokenizer(), "shape", "shape"),
                    EngineConfig(device="cuda", policy="resident", show_progress=False))
    p = SamplingParams(max_new_tokens=24, ignore_eos=True)
    for rep in range(2):
        r = engine.generate([ids[0].tolist()], p)[0]
        res.setdefault("finemoe resident", []).append(r.metrics.tpot_s)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate([ids[0].tolist()], SamplingParams(max_new_tokens=5, ignore_eos=True))
    with open(os.path.join(args.out, "profile_finemoe.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    with open(os.path.join(args.out, "profile_step.json"), "w") as f:
        json.dump(res, f)
    for k, v in res.items():
        print(f"{k:24s} " + "  ".join(f"{x * 1e3:7.2f} ms" for x in v))


if __name__ == "__main__":
    main()

"""Continuous batching on the GPU (engine/continuous.py, issue 22): its greedy tokens against plain transformers'.

A Qwen1.5-MoE-A2.7B-shaped random bf16 model; prompts of different lengths, each with its own number of new tokens.
  alone      every request runs by itself through the continuous batch, one after another (slot KV cache,
             chunked prefill, decode CUDA graphs of bucket 1). Reference: plain transformers through the static-cache
             step, the same prompt alone (check_exact_gpu._reference). Must be exact.
  staggered  3 rows, requests queued at different steps, joining and leaving a running batch. Reference: the same,
             each prompt alone. On the CPU in fp32 this is exact (tests/test_continuous_batching.py); in bf16 on the GPU
             a row's matmuls run in batches of other sizes than alone, whose kernels may round differently, so the
             fraction of equal tokens is reported, not required.
Per policy (resident, and each of --policies at --budget). Short table last; JSON to --out.

    PYTHONPATH=src:benchmarks python3 benchmarks/check_continuous_gpu.py --out $OUT/continuous.json
    PYTHONPATH=src:benchmarks python3 benchmarks/check_continuous_gpu.py --device cpu --tiny --layers 2   (smoke)
"""
from __future__ import annotations

import argparse

import torch

from benchmarks_common import build_model, device_name, write_json
from check_exact_gpu import _reference
from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.models.default import default_tokenizer
from finemoe.models.loader import LoadedModel

PROMPT_LENS = (40, 64, 23, 50)
NEW_TOKENS = (24, 12, 24, 20)       # the second request leaves early
ARRIVALS = (0, 2, 3, 6)             # the step at which each request is queued (staggered)


def staggered(engine: Engine, prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Queue request i at step ARRIVALS[i], admit first come first served while the batch has room, step until
    every request is done -> (each request's tokens, the KV length per row the batch ended with, per request:
    every request here fits one length bucket, so the cache never grows mid-run)."""
    batch = engine.continuous_batch()
    reqs = [engine.make_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
            for p, n in zip(prompts, NEW_TOKENS)]
    queue, step = [], 0
    while step <= max(ARRIVALS) or queue or not batch.done:
        queue += [r for r, a in zip(reqs, ARRIVALS) if a == step]
        while queue and batch.has_room():
            batch.admit(queue.pop(0))
        batch.step()
        step += 1
    return [r.output_ids for r in reqs], [batch.kv.length] * len(reqs)


def alone(engine: Engine, prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Each request by itself through its own continuous batch -> (each request's tokens, the KV length per row
    its batch used: the slot cache's bucket plus its discard column)."""
    out, lengths = [], []
    for p, n in zip(prompts, NEW_TOKENS):
        req = engine.make_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
        batch = engine.continuous_batch()
        batch.admit(req)
        while not batch.done:
            batch.step()
        out.append(req.output_ids)
        lengths.append(batch.kv.length)
    return out, lengths


def first_diff(got: list[int], want: list[int]) -> int | None:
    """The first position where `got` differs from `want` (None: equal)."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return i
    return None if len(got) == len(want) else min(len(got), len(want))


def compare(got: list[list[int]], want: list[list[int]], suffix: str) -> dict:
    """Per-request exactness of `got` against `want`: exact requests, equal-token fraction, first differences."""
    equal = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y))
    out = {"requests_exact" + suffix: sum(x == y for x, y in zip(got, want)),
           "token_agreement" + suffix: equal / sum(len(y) for y in want)}
    if not suffix:
        out["first_diff"] = [first_diff(x, y) for x, y in zip(got, want)]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policies", default="lru,finemoe")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="the engine's context limit (default: the model's, as `serve`); the slot KV cache "
                         "itself grows to the bucket of the longest running request")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test of this script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model = build_model(args.layers, 0, args.device, args.tiny)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
    loaded = LoadedModel(model, default_tokenizer(), "qwen1.5-moe-shape-random", "Qwen1.5-MoE-A2.7B shape, random bf16")
    engine = Engine(loaded, EngineConfig(device=args.device, policy="resident", show_progress=False,
                                         max_batch_size=3, max_num_batched_tokens=64, max_model_len=args.max_model_len))
    ids = [torch.tensor([p], device=args.device) for p in prompts]
    refs = [_reference(model, x, n)[0] for x, n in zip(ids, NEW_TOKENS)]
    refs_at: dict[tuple[int, int], list[int]] = {}      # (request, KV length) -> plain transformers' tokens
    rows, resident_of = [], {}
    for mode in ("alone", "staggered"):
        for policy in ["resident"] + args.policies.split(","):
            engine.reconfigure(policy, None if policy == "resident" else args.budget)
            got, kv_lens = (alone if mode == "alone" else staggered)(engine, prompts)
            for i, length in enumerate(kv_lens):
                if (i, length) not in refs_at:
                    refs_at[i, length] = _reference(model, ids[i], NEW_TOKENS[i], length)[0]
            refs_kv = [refs_at[i, length] for i, length in enumerate(kv_lens)]
            resident_of.setdefault(mode, got)
            row = {"mode": mode, "policy": policy, "budget": "100%" if policy == "resident" else args.budget,
                   "requests": len(refs), "engine_kv_lens": kv_lens, **compare(got, refs, ""),
                   **compare(got, refs_kv, "_at_engine_kv"), **compare(got, resident_of[mode], "_vs_resident")}
            rows.append(row)
            print(f"  {mode} {policy}: {row['requests_exact']}/{len(refs)} requests exact "
                  f"({row['requests_exact_at_engine_kv']} at the engine's KV length, "
                  f"{row['requests_exact_vs_resident']} equal to resident)", flush=True)
    engine.close()
    result = {"device": device_name(args.device), "torch": torch.__version__, "layers": args.layers, "rows": rows,
              "alone_exact": all(r["requests_exact"] == r["requests"] for r in rows if r["mode"] == "alone"),
              "offload_equals_resident": all(r["requests_exact_vs_resident"] == r["requests"] for r in rows)}
    write_json(args.out, result)
    print(f"\n{result['device']}, torch {torch.__version__}, {args.layers} layers, prompts {PROMPT_LENS}, "
          f"new tokens {NEW_TOKENS}, prefill chunks of 64 tokens")
    print("exact requests and equal tokens against plain transformers (its KV cache the request's length bucket, and "
          "the length per row the engine's slot cache used), and against resident in the same mode; first differing "
          "token per request")
    print(f"{'mode':10s} {'policy':10s} {'budget':>6s} {'plain':>11s} {'plain@kv':>11s} {'resident':>11s} "
          f"{'first diff vs plain':>22s}")
    for r in rows:
        cells = " ".join(f"{r['requests_exact' + k]:>2d}/{r['requests']} {r['token_agreement' + k]:5.3f}"
                         for k in ("", "_at_engine_kv", "_vs_resident"))
        print(f"{r['mode']:10s} {r['policy']:10s} {r['budget']:>6s} {cells} {str(r['first_diff']):>22s}")
    print("ALONE EXACT" if result["alone_exact"] else "ALONE NOT EXACT",
          "; OFFLOADING EQUALS RESIDENT" if result["offload_equals_resident"] else "; OFFLOADING DIFFERS FROM RESIDENT")
    return result


if __name__ == "__main__":
    main()

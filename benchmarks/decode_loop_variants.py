"""Why is transformers' generate() faster than a plain decode loop? Time loop variants against it,
interleaved, on the Qwen1.5-MoE-shaped random model (decode steps, batch 1). Diagnostic only.

    PYTHONPATH=src:benchmarks python3 benchmarks/decode_loop_variants.py --rounds 4
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from bench_engine import plain_generate_tpot
from benchmarks_common import build_model


def loop(model, ids, n: int, grad_ctx, sync_each_step: bool, tokens: list[int] | None = None) -> float:
    """Mean decode-step time over n steps (synchronized at the ends only); appends the greedy tokens to
    `tokens` when given (which syncs every step)."""
    with grad_ctx():
        mask = torch.ones_like(ids)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        pos = torch.tensor([[ids.shape[1] - 1]], device=ids.device)
        if tokens is not None:
            tokens.append(int(tok))
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos + 1
            out = model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            if tokens is not None:
                tokens.append(int(tok))
            elif sync_each_step:
                int(tok)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n


def profile_both(model, ids) -> None:
    from torch.profiler import ProfilerActivity, profile

    def table(fn, steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        rows = sorted(prof.key_averages(), key=lambda e: -e.count)[:25]
        return {e.key: e.count / steps for e in rows}

    n = 8
    loop_ops = table(lambda: loop(model, ids, n, torch.inference_mode, True), n)
    gen_ops = table(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n + 1,
                                           min_new_tokens=n + 1, do_sample=False, pad_token_id=0), n)
    keys = sorted(set(loop_ops) | set(gen_ops), key=lambda k: -max(loop_ops.get(k, 0), gen_ops.get(k, 0)))
    print(f"{'op (calls per decode step)':44s} {'loop':>8s} {'generate':>9s}")
    for k in keys[:30]:
        print(f"{k[:44]:44s} {loop_ops.get(k, 0):8.1f} {gen_ops.get(k, 0):9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--profile", action="store_true", help="op counts per decode step: loop vs generate()")
    args = ap.parse_args()
    model = build_model(args.layers, 0, "cuda", False)
    ids = torch.randint(2, 1000, (1, 64), device="cuda")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def no_cudnn():
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))
        return stack

    variants = {
        "inference_mode, sync/step": (torch.inference_mode, True),
        "no_grad, sync/step": (torch.no_grad, True),
        "inference_mode, sdpa w/o cudnn": (no_cudnn, True),
    }
    if args.profile:
        profile_both(model, ids)
        return
    res: dict[str, list[float]] = {}
    loop(model, ids, 4, torch.no_grad, True)
    for _ in range(args.rounds):
        for name, (ctx, sync) in variants.items():
            res.setdefault(name, []).append(loop(model, ids, 24, ctx, sync))
        res.setdefault("generate()", []).append(plain_generate_tpot(model, ids, 24))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                         do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    for name, (ctx, _) in variants.items():
        got: list[int] = []
        loop(model, ids, 23, ctx, True, got)
        print(f"greedy tokens equal generate()'s with {name}: {got == ref}")
    for k, v in res.items():
        print(f"{k:28s} median {statistics.median(v) * 1e3:7.2f} ms   " + " ".join(f"{x * 1e3:6.1f}" for x in v))


if __name__ == "__main__":
    main()

"""docs/BENCHMARKS.md, "Exactness on the GPU": for every engine policy, greedy tokens of finemoe under each policy and
budget against plain transformers run through the same static-cache step (the reference docs/BENCHMARKS.md uses;
transformers' own generate() with its dynamic cache picks other tokens than its static-cache path on a random bf16
model).

Qwen1.5-MoE-A2.7B-shaped random bf16 model. Batch 1, and a batch of same-length prompts (no padding, so plain
transformers' batched static step is the reference for every row). Every policy runs with the engine defaults
(CUDA graphs on the GPU), histories learning online from empty. `oracle` needs a recorded trace and is left out.

    PYTHONPATH=src:benchmarks python3 benchmarks/check_exact_gpu.py --out $OUT/exact.json
    PYTHONPATH=src:benchmarks python3 benchmarks/check_exact_gpu.py --tiny --device cpu --layers 3   (smoke test)
"""
from __future__ import annotations

import argparse

import torch

from benchmarks_common import build_model, device_name, write_json  # noqa: E402  (same folder)
from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine.static_kv import StaticState, bucket_length
from finemoe.eval.variants import parse_variants
from finemoe.models.default import default_tokenizer
from finemoe.models.kv_cache import cache_kwargs
from finemoe.models.loader import LoadedModel

POLICIES = "lru,lfu,deepspeed,finemoe,finemoe/neighbors=1,moe-infinity,promoe,mixtral-offloading"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=3, help="the batched check's prompts (same length)")
    ap.add_argument("--budgets", default="10%,25%")
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test of this script)")
    args = ap.parse_args(argv)
    model = build_model(args.layers, 0, args.device, args.tiny)
    g = torch.Generator().manual_seed(0)
    n, vocab = args.new_tokens, model.config.vocab_size
    batches = {1: torch.randint(2, vocab, (1, args.prompt_len), generator=g).to(args.device),
               args.batch: torch.randint(2, vocab, (args.batch, args.prompt_len), generator=g).to(args.device)}
    refs = {b: _reference(model, ids, n) for b, ids in batches.items()}               # per row: n tokens
    engine = Engine(LoadedModel(model, default_tokenizer(), "qwen1.5-moe-shape-random",
                                "Qwen1.5-MoE-A2.7B shape, random bf16"),
                    EngineConfig(device=args.device, policy="resident", show_progress=False, max_batch_size=args.batch))
    rows = []
    for v in parse_variants("resident," + args.policies):          # POLICY/KEY=VALUE/..., as in `finemoe bench`
        for budget in ([None] if v.policy == "resident" else args.budgets.split(",")):
            for b, ids in batches.items():
                engine.reconfigure(v.policy, budget, policy_options=v.options)
                reqs = engine.generate(ids.tolist(), SamplingParams(max_new_tokens=n, ignore_eos=True))
                s = engine.summary(reqs)
                same = [r.output_ids == ref for r, ref in zip(reqs, refs[b])]
                rows.append({"policy": v.label, "budget": budget or "100%", "batch": b, "exact": all(same),
                             "rows_exact": sum(same), "hit_rate": s["hit_rate"],
                             "bytes_per_token": s["bytes_per_token"],
                             "decode_path": s.get("decode_path")})
    result = {"device": device_name(args.device), "torch": torch.__version__,
              "layers": args.layers, "prompt_len": args.prompt_len, "new_tokens": n, "rows": rows,
              "all_exact": all(r["exact"] for r in rows)}
    write_json(args.out, result)
    print(f"\n{result['device']}, torch {torch.__version__}, {args.layers} layers, {n} new tokens")
    print(f"{'policy':28s} {'budget':>6s} {'batch':>5s} {'hit':>5s} {'MB/tok':>7s} exact")
    for r in rows:
        print(f"{r['policy']:28s} {r['budget']:>6s} {r['batch']:5d} {r['hit_rate']:5.2f} "
              f"{r['bytes_per_token'] / 1e6:7.1f} {r['rows_exact']}/{r['batch']}")
    print("ALL EXACT" if result["all_exact"] else "NOT EXACT")
    return result


@torch.inference_mode()
def _reference(model, ids: torch.Tensor, n: int, length: int | None = None) -> list[list[int]]:
    """Greedy tokens [B][n] of the unmodified model through the static-cache step finemoe uses (eager; like
    bench_fast_path.plain_static, for any batch size), its KV cache `length` tokens long (default: the bucket of
    prompt + n)."""
    st = StaticState(model, ids.shape[0], length or bucket_length(ids.shape[1] + n), ids.device)
    mask4, pos = st.prefill_inputs(torch.ones_like(ids))
    out = model(input_ids=ids, attention_mask=mask4, position_ids=pos, use_cache=True, logits_to_keep=1,
                **cache_kwargs(model, st.kv))
    tok = out.logits[:, -1].argmax(-1, keepdim=True)                                  # [B, 1]
    steps = [tok]
    while len(steps) < n:
        st.ids.copy_(tok)
        tok = st.step().argmax(-1, keepdim=True)
        steps.append(tok)
    return torch.cat(steps, 1).tolist()                                               # [B, n]


if __name__ == "__main__":
    main()

"""Where a graphed decode step spends its time (issue 7): kernels per step, the heaviest kernels, and what
`torch.compile` of transformers' small modules (RMSNorm, rotary, MLP) does to the graphed step time.

Plain transformers, Qwen1.5-MoE-A2.7B shape (random bf16), batch 1, through finemoe's static-cache step.

    PYTHONPATH=src:benchmarks python3 benchmarks/fast_path_kernels.py --out $OUT/kernels.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

import torch

from benchmarks_common import build_model  # noqa: E402  (same folder)
from finemoe.engine.static_kv import StaticState


@torch.inference_mode()
def graphed_tpot(model, ids, steps: int = 64) -> tuple[float, list[int]]:
    st = StaticState(model, 1, 256, ids.device)
    mask4, pos = st.prefill_inputs(torch.ones_like(ids))
    out = model(input_ids=ids, attention_mask=mask4, position_ids=pos, past_key_values=st.kv, use_cache=True,
                logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):                       # warm-up steps (compiles, autotuning)
            st.ids.copy_(tok)
            tok = st.step().argmax(-1, keepdim=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        logits = st.step()
    tokens, times = [], []
    for _ in range(steps):
        t = time.perf_counter()
        st.ids.copy_(tok)
        g.replay()
        tok = logits.argmax(-1, keepdim=True)
        tokens.append(int(tok))
        times.append(time.perf_counter() - t)
    return statistics.median(times[4:]), tokens


@torch.inference_mode()
def kernel_census(model, ids) -> dict:
    st = StaticState(model, 1, 256, ids.device)
    mask4, pos = st.prefill_inputs(torch.ones_like(ids))
    model(input_ids=ids, attention_mask=mask4, position_ids=pos, past_key_values=st.kv, use_cache=True, logits_to_keep=1)
    st.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        st.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = Counter()
    count = Counter()
    for e in kernels:
        by_name[e.name[:80]] += e.device_time
        count[e.name[:80]] += 1
    total = sum(by_name.values())
    top = [{"kernel": k, "us": v, "calls": count[k]} for k, v in by_name.most_common(15)]
    return {"kernels_per_step": len(kernels), "kernel_time_us": total, "top": top}


def compile_modules(model, kinds: set[str]) -> int:
    n = 0
    for m in model.modules():
        name = type(m).__name__
        if ("norm" in kinds and name.endswith("RMSNorm")) or ("rotary" in kinds and name.endswith("RotaryEmbedding")) \
                or ("mlp" in kinds and name.endswith("MLP")) or ("attn" in kinds and name.endswith("Attention")) \
                or ("moe" in kinds and name.endswith("SparseMoeBlock")):
            m.compile()
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = build_model(args.layers, 0, "cuda", False)
    ids = torch.randint(2, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    census = kernel_census(model, ids)
    rows = []
    base, base_tokens = graphed_tpot(model, ids)
    rows.append({"compiled": "none", "tpot_s": base, "same_tokens": True})
    torch._dynamo.config.recompile_limit = 64   # one compile per layer instance (layer_idx is specialised)
    for kinds in (["norm"], ["norm", "rotary"], ["norm", "rotary", "mlp"], ["norm", "rotary", "mlp", "attn"]):
        t0 = time.perf_counter()
        n = compile_modules(model, set(kinds))
        tpot, tokens = graphed_tpot(model, ids)
        rows.append({"compiled": "+".join(kinds), "modules": n, "tpot_s": tpot, "same_tokens": tokens == base_tokens,
                     "compile_and_run_s": time.perf_counter() - t0})
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
              "census": census, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\neager step: {census['kernels_per_step']} kernels, {census['kernel_time_us'] / 1e3:.2f} ms of kernel time")
    for t in census["top"][:10]:
        print(f"  {t['us']:8.0f} us {t['calls']:5d}x {t['kernel']}")
    for r in rows:
        print(f"graphed step, compiled {r['compiled']:18s}: {r['tpot_s'] * 1e3:6.2f} ms  same tokens {r['same_tokens']}")


if __name__ == "__main__":
    main()

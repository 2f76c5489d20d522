"""docs/BENCHMARKS.md, "The fast path" (all three tables): the fast decode path on a Qwen1.5-MoE-A2.7B-shaped
random bf16 model.

One run reports, all measured in this process on the same model:
  - plain transformers: generate() (dynamic cache) and the static-cache step, eager and CUDA-graphed;
  - finemoe `resident` and `lru` at 25%, CUDA graphs against eager, batch 1 (64-token prompt, 128 new);
  - the 25% target: TPOT <= 1.25 x (resident TPOT + bytes moved per token / measured pinned bandwidth);
  - batch 8 and 32 decode throughput, resident and 25%;
  - prefill TTFT at 25% for 64/512/2048-token prompts against the copy floor of the experts they touch;
  - greedy tokens against plain transformers' (static-cache loop and generate()).
Random weights route almost uniformly: this measures the engine, not prediction.

    PYTHONPATH=src:benchmarks python3 benchmarks/bench_fast_path.py --out $OUT/fast_path.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_engine import plain_generate_tpot, raw_pinned_copy_gbps  # noqa: E402  (same folder)
from benchmarks_common import build_model, write_json  # noqa: E402
from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine.static_kv import StaticState, bucket_length
from finemoe.models.compile import compile_small_modules
from finemoe.models.default import default_tokenizer
from finemoe.models.kv_cache import cache_kwargs
from finemoe.models.loader import LoadedModel


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def plain_static(model, ids: torch.Tensor, n: int, graph: bool) -> tuple[list[int], float]:
    """Greedy decode of the unmodified model through the same static-cache step finemoe uses; returns tokens and
    the median step time. `graph`: replay the step as one CUDA graph (plain transformers, graphed)."""
    st = StaticState(model, ids.shape[0], bucket_length(ids.shape[1] + n), ids.device)
    mask4, pos = st.prefill_inputs(torch.ones_like(ids))
    out = model(input_ids=ids, attention_mask=mask4, position_ids=pos, use_cache=True, logits_to_keep=1,
                **cache_kwargs(model, st.kv))
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens, times = [int(tok)], []
    step = st.step
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            st.ids.copy_(tok)
            logits = st.step()                       # warm-up step, real
        torch.cuda.current_stream().wait_stream(s)
        tok = logits.argmax(-1, keepdim=True)
        tokens.append(int(tok))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_logits = st.step()
        step = lambda: (g.replay(), static_logits)[1]  # noqa: E731
    while len(tokens) < n:
        t = time.perf_counter()
        st.ids.copy_(tok)
        tok = step().argmax(-1, keepdim=True)
        tokens.append(int(tok))
        times.append(time.perf_counter() - t)
    return tokens, statistics.median(times)


@torch.inference_mode()
def plain_generate_tokens(model, ids: torch.Tensor, n: int) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def engine_row(engine: Engine, prompts: list[list[int]], n: int, label: str) -> dict:
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    engine.run([engine.make_request(p, SamplingParams(max_new_tokens=4, ignore_eos=True)) for p in prompts])  # warm-up
    t0 = engine.runtime.totals.bytes_copied
    reqs = engine.run([engine.make_request(p, params) for p in prompts])
    s = engine.summary(reqs)
    first = max(r.metrics.t_first for r in reqs)
    last = max(r.metrics.t_last for r in reqs)
    decode_tokens = sum(len(r.output_ids) - 1 for r in reqs)
    return {"system": label, "batch": len(prompts), "tokens": reqs[0].output_ids, "ttft_s": s["ttft_s"],
            "tpot_s": s["tpot_s"], "decode_tok_s": decode_tokens / (last - first), "hit_rate": s["hit_rate"],
            "bytes_per_token": (engine.runtime.totals.bytes_copied - t0) / max(decode_tokens + len(reqs), 1),
            "decode_path": s["decode_path"], "cache_slots": s["cache_slots"]}


def prefill_vs_floor(engine: Engine, vocab: int, lengths: list[int], gbps: float, budget: str) -> list[dict]:
    """TTFT of one prompt on an empty cache (lru at `budget`) against the copy floor of the experts it touches,
    without and with prefill lookahead."""
    rows, g = [], torch.Generator().manual_seed(1)
    for n in lengths:
        prompt = torch.randint(2, vocab, (n,), generator=g).tolist()
        for lookahead in (False, True):
            engine.reconfigure("lru", budget, prefill_lookahead=lookahead)
            engine.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))   # warm-up (shapes)
            engine.reconfigure("lru", budget, prefill_lookahead=lookahead)                 # empty cache
            req = engine.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))[0]
            t = engine.runtime.totals
            touched = int(t.hits.sum() + t.misses.sum())
            floor = touched * engine.geometry.expert_bytes / (gbps * 1e9)
            rows.append({"prompt_tokens": n, "lookahead": lookahead, "ttft_s": req.metrics.ttft_s,
                         "experts_touched": touched, "experts_copied": t.bytes_copied // engine.geometry.expert_bytes,
                         "copy_floor_s": floor, "ttft_over_floor": req.metrics.ttft_s / floor if floor else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--prefill-lengths", default="64,512,2048")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test of this script)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    model = build_model(args.layers, 0, args.device, args.tiny)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (1, args.prompt_len), generator=g).to(args.device)
    n = args.new_tokens
    plain = {"generate_tpot_s": plain_generate_tpot(model, ids, 32) if cuda else None,
             "generate_tokens": plain_generate_tokens(model, ids, n)}
    ref_tokens, plain["static_eager_tpot_s"] = plain_static(model, ids, n, graph=False)
    if cuda:
        graphed_tokens, plain["static_graph_tpot_s"] = plain_static(model, ids, n, graph=True)
        plain["static_graph_exact"] = graphed_tokens == ref_tokens
    plain["generate_equals_static"] = plain["generate_tokens"][:n] == ref_tokens
    engine = Engine(LoadedModel(model, default_tokenizer(), "qwen1.5-moe-shape-random",
                                "Qwen1.5-MoE-A2.7B shape, random bf16"),
                    EngineConfig(device=args.device, policy="resident", show_progress=False,
                                 max_batch_size=max([1] + [int(x) for x in args.batches.split(",") if x])))
    eb = engine.geometry.expert_bytes
    gbps = max(raw_pinned_copy_gbps(60 * eb, reps=9), raw_pinned_copy_gbps(60 * eb, chunks=60, reps=9)) if cuda \
        else float("nan")
    prompt = ids[0].tolist()
    rows = []
    for policy, budget in (("resident", None), ("lru", args.budget)):
        for graphs in ((True, False) if cuda else (False,)):
            engine.reconfigure(policy, budget, cuda_graphs=graphs)
            r = engine_row(engine, [prompt], n, f"{policy} {budget or '100%'} {'graphs' if graphs else 'eager'}")
            r["exact"] = r.pop("tokens") == ref_tokens
            rows.append(r)
    resident = rows[0]["tpot_s"]
    lru = rows[2] if cuda else rows[1]
    bound = 1.25 * (resident + lru["bytes_per_token"] / (gbps * 1e9)) if cuda else None
    batch_rows = []
    for b in [int(x) for x in args.batches.split(",") if x]:
        prompts = [torch.randint(2, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(b)]
        for policy, budget in (("resident", None), ("lru", args.budget)):
            engine.reconfigure(policy, budget, cuda_graphs=cuda)
            r = engine_row(engine, prompts, n, f"{policy} {budget or '100%'} batch {b}")
            r.pop("tokens")
            batch_rows.append(r)
    prefill = prefill_vs_floor(engine, vocab, [int(x) for x in args.prefill_lengths.split(",")], gbps, args.budget)
    if cuda:   # the same rows with transformers' small modules compiled (models/compile.py)
        compile_small_modules(engine.model)
        for policy, budget in (("resident", None), ("lru", args.budget)):
            engine.reconfigure(policy, budget, cuda_graphs=True)
            r = engine_row(engine, [prompt], n, f"{policy} {budget or '100%'} graphs+compile")
            r["exact"] = r.pop("tokens") == ref_tokens
            rows.append(r)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "layers": args.layers, "prompt_len": args.prompt_len, "new_tokens": n, "pinned_h2d_gbps": gbps,
              "plain": plain, "rows": rows, "lru_target_s": bound, "batch_rows": batch_rows, "prefill": prefill}
    write_json(args.out, result)
    print(f"\nplain transformers: generate() {fmt(plain['generate_tpot_s'])} | static eager "
          f"{fmt(plain['static_eager_tpot_s'])} | static graph {fmt(plain.get('static_graph_tpot_s'))} "
          f"| generate==static tokens {plain['generate_equals_static']} | pinned {gbps:.1f} GB/s")
    print(f"{'system':28s} {'TTFT ms':>8s} {'TPOT ms':>8s} {'tok/s':>8s} {'hit':>5s} {'MB/tok':>7s} exact")
    for r in rows + batch_rows:
        print(f"{r['system']:28s} {r['ttft_s'] * 1e3:8.1f} {r['tpot_s'] * 1e3:8.2f} {r['decode_tok_s']:8.1f} "
              f"{r['hit_rate']:5.2f} {r['bytes_per_token'] / 1e6:7.0f} {r.get('exact', '')}")
    if bound:
        print(f"25% target: TPOT {lru['tpot_s'] * 1e3:.2f} ms <= {bound * 1e3:.2f} ms: {lru['tpot_s'] <= bound}")
    for p in prefill:
        print(f"prefill {p['prompt_tokens']:5d} tok{' +lookahead' if p['lookahead'] else '           '}: TTFT "
              f"{p['ttft_s'] * 1e3:7.1f} ms, floor {p['copy_floor_s'] * 1e3:7.1f} ms ({p['experts_touched']} touched, "
              f"{p['experts_copied']} copied) -> x{p['ttft_over_floor']:.2f}")


def fmt(s) -> str:
    return "-" if s is None else f"{s * 1e3:.2f} ms"


if __name__ == "__main__":
    main()

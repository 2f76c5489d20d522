"""docs/BENCHMARKS.md, "Host memory and demand-load copy rate": plain transformers vs finemoe on a
Qwen1.5-MoE-A2.7B-shaped random model.

One run reports: resident TPOT for plain transformers (manual loop and generate()) and for finemoe
`resident`; TPOT/TTFT with `lru` at several expert budgets; the demand-load copy throughput against a
raw pinned host-to-device copy measured in the same run; and whether greedy tokens equal plain
transformers'. Random weights route almost uniformly: this measures the engine, not prediction.

    PYTHONPATH=src python3 benchmarks/bench_engine.py --out $OUT/bench_engine.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks_common import build_model, demand_load_gbps, write_json  # noqa: E402  (same folder)
from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine.metrics import peak_host_bytes
from finemoe.models.default import default_tokenizer
from finemoe.models.kv_cache import cache_kwargs, returned_cache
from finemoe.models.loader import LoadedModel


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def plain_loop(model, ids: torch.Tensor, n: int) -> tuple[list[int], float, float]:
    """Greedy decode with the unmodified model; returns tokens, TTFT, median per-step time."""
    _sync()
    t0 = time.perf_counter()
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(tok)]
    ttft = time.perf_counter() - t0
    cache, steps = returned_cache(model, out), []
    pos = torch.tensor([[ids.shape[1] - 1]], device=ids.device)
    for _ in range(n - 1):
        s = time.perf_counter()
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        out = model(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=True,
                    **cache_kwargs(model, cache))
        cache = returned_cache(model, out)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(tok))  # sync per step, as any server must
        steps.append(time.perf_counter() - s)
    return tokens, ttft, statistics.median(steps)


@torch.inference_mode()
def plain_generate_tpot(model, ids: torch.Tensor, n: int) -> float:
    def run(k):
        _sync()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                       do_sample=False, pad_token_id=0)
        _sync()
        return time.perf_counter() - t
    run(4)
    return (run(n) - run(1)) / (n - 1)


def raw_pinned_copy_gbps(nbytes: int, chunks: int = 1, reps: int = 5) -> float:
    """Raw pinned H2D rate: `nbytes` in `chunks` back-to-back copies on the current stream (median of reps)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    step = nbytes // chunks
    times = []
    for _ in range(reps + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for c in range(chunks):
            dst[c * step:(c + 1) * step].copy_(src[c * step:(c + 1) * step], non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return nbytes / statistics.median(times[1:]) / 1e9


class PlainToggle:
    """Lets the same model run as plain transformers between finemoe runs (interleaved timing rounds):
    keeps a device copy of the expert weights and re-attaches it with transformers' own implementation."""

    def __init__(self, model, engine_layers_fn):
        from finemoe.models.adapters import expert_tensor_names, find_moe_layers
        self.model = model
        self.impl = model.config._experts_implementation
        self.layers = find_moe_layers(model)   # found once: the toggles below take and give back their weights
        self.saved = [{n: getattr(layer.experts, n).detach().clone() for n in expert_tensor_names(layer.experts)}
                      for layer in self.layers]

    def plain(self):
        for layer, tensors in zip(self.layers, self.saved):
            for n, t in tensors.items():
                layer.experts.register_parameter(n, torch.nn.Parameter(t, requires_grad=False))
        self.model.set_experts_implementation(self.impl)

    def finemoe(self):
        for layer, tensors in zip(self.layers, self.saved):
            for n in tensors:
                delattr(layer.experts, n)
        self.model.set_experts_implementation("finemoe")


def engine_run(engine: Engine, ids: list[int], n: int) -> dict:
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    engine.generate([ids], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    reqs = engine.generate([ids], params)
    s = engine.summary(reqs)
    return {"tokens": reqs[0].output_ids, "ttft_s": s["ttft_s"], "tpot_s": s["tpot_s"], "hit_rate": s["hit_rate"],
            "bytes_per_token": s["bytes_per_token"], "stall_s": s["stall_s"], "cache_slots": s["cache_slots"],
            "expert_budget_bytes": s["expert_budget_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--budgets", default="25%,50%,100%")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians reported)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test of this script)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    model = build_model(args.layers, args.seed, args.device, args.tiny)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(2, model.config.vocab_size, (1, args.prompt_len), generator=g).to(args.device)
    plain_loop(model, ids, 8)
    ref_tokens, _, _ = plain_loop(model, ids, args.new_tokens)
    toggle = PlainToggle(model, None) if cuda else None
    t0 = time.perf_counter()
    loaded = LoadedModel(model, default_tokenizer(), "qwen1.5-moe-shape-random", "Qwen1.5-MoE-A2.7B shape, random bf16")
    engine = Engine(loaded,
                    EngineConfig(device=args.device, policy="resident", show_progress=False))
    offload_s = time.perf_counter() - t0
    # interleaved rounds: plain loop, plain generate(), finemoe resident; medians over rounds
    rounds = {"plain": [], "generate": [], "resident": []}
    for _ in range(args.rounds if cuda else 1):
        if toggle:
            toggle.plain()
            _, ttft, tpot = plain_loop(model, ids, args.new_tokens)
            rounds["plain"].append((ttft, tpot))
            rounds["generate"].append((None, plain_generate_tpot(model, ids, 32)))
            toggle.finemoe()
        r = engine_run(engine, ids[0].tolist(), args.new_tokens)
        rounds["resident"].append((r["ttft_s"], r["tpot_s"]))
    med = lambda xs: statistics.median(xs) if xs and xs[0] is not None else None  # noqa: E731
    rows = []
    if toggle:
        rows.append({"system": "transformers (manual loop)", "ttft_s": med([a for a, _ in rounds["plain"]]),
                     "tpot_s": med([b for _, b in rounds["plain"]]), "exact": True,
                     "tpot_rounds_s": [b for _, b in rounds["plain"]]})
        rows.append({"system": "transformers generate()", "ttft_s": None,
                     "tpot_s": med([b for _, b in rounds["generate"]]),
                     "exact": None, "tpot_rounds_s": [b for _, b in rounds["generate"]]})
    rows.append({"system": "finemoe resident", **r, "ttft_s": med([a for a, _ in rounds["resident"]]),
                 "tpot_s": med([b for _, b in rounds["resident"]]), "tpot_rounds_s": [b for _, b in rounds["resident"]],
                 "exact": r.pop("tokens") == ref_tokens})
    del toggle
    for b in args.budgets.split(","):
        engine.reconfigure("lru", b)
        r = engine_run(engine, ids[0].tolist(), args.new_tokens)
        rows.append({"system": f"finemoe lru {b}", **r, "exact": r.pop("tokens") == ref_tokens})
    raw_one = raw_pinned_copy_gbps(60 * engine.geometry.expert_bytes) if cuda else float("nan")
    raw_chunked = raw_pinned_copy_gbps(60 * engine.geometry.expert_bytes, chunks=60) if cuda else float("nan")
    raw = max(raw_one, raw_chunked)
    demand = demand_load_gbps(engine, args.layers) if cuda else float("nan")
    result = {"device": dev, "torch": torch.__version__, "layers": args.layers, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "expert_bytes": engine.geometry.expert_bytes,
              "offload_setup_s": offload_s, "peak_host_bytes": peak_host_bytes(),
              "host_expert_bytes": engine.store.nbytes, "raw_pinned_h2d_gbps": raw, "raw_one_copy_gbps": raw_one,
              "raw_per_expert_copies_gbps": raw_chunked, "demand_load_gbps": demand,
              "demand_vs_raw": demand / raw, "rows": rows}
    write_json(args.out, result)
    print(f"\ndevice {dev}; expert {engine.geometry.expert_bytes} B; "
          f"host experts {engine.store.nbytes / 2**30:.2f} GiB; "
          f"peak host RSS {result['peak_host_bytes'] / 2**30:.2f} GiB; offload setup {offload_s:.1f} s")
    print(f"raw pinned H2D {raw:.1f} GB/s (one copy {raw_one:.1f}, per-expert copies {raw_chunked:.1f}); "
          f"demand-load {demand:.1f} GB/s ({100 * demand / raw:.0f}% of raw)")
    print(f"{'system':28s} {'TTFT ms':>9s} {'TPOT ms':>9s} {'hit rate':>9s} {'MB/token':>9s} {'exact':>6s}")
    for row in rows:
        ttft = f"{row['ttft_s'] * 1e3:9.1f}" if row.get("ttft_s") is not None else f"{'-':>9s}"
        hr = f"{row['hit_rate']:9.3f}" if "hit_rate" in row else f"{'-':>9s}"
        mb = f"{row['bytes_per_token'] / 1e6:9.1f}" if "bytes_per_token" in row else f"{'-':>9s}"
        print(f"{row['system']:28s} {ttft} {row['tpot_s'] * 1e3:9.2f} {hr} {mb} {str(row['exact']):>6s}")


if __name__ == "__main__":
    main()

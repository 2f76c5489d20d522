"""docs/BENCHMARKS.md, "Exactness on the GPU": CUDA-graph decode counts the same hits, misses and bytes, and emits the
same tokens, as eager decode of the same static batch (resident and lru at 25%, batch 1 and 3). Small
Qwen1.5-MoE-shaped model. Also lru at 25% with `--miss-compute cpu` and `auto` (a layer's CPU half runs between
the graph's segment replays, engine/cpu_misses.py): the graph path runs the eager path's ops, so it must give the
same tokens, counts and CPU-computed experts (auto splits by one fixed cost model, calibrated once).

    PYTHONPATH=src:benchmarks python3 benchmarks/check_graph_accounting.py
"""
from __future__ import annotations

import torch

from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.models.default import default_tokenizer
from finemoe.models.loader import LoadedModel
from finemoe.models.random_shapes import build_random


def run(engine: Engine, prompts, n: int) -> tuple:
    reqs = engine.run([engine.make_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p in prompts])
    return ([r.output_ids for r in reqs], [(r.metrics.hits, r.metrics.misses, r.metrics.cpu_experts) for r in reqs],
            engine.runtime.totals.bytes_copied)


def main() -> None:
    model = build_random("random:qwen1.5-moe-a2.7b@4", "cuda", torch.bfloat16, 0)[0]
    engine = Engine(LoadedModel(model, default_tokenizer(), "s", "s"),
                    EngineConfig(device="cuda", policy="resident", show_progress=False))
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randint(2, 1000, (24,), generator=g).tolist()],
               [torch.randint(2, 1000, (n,), generator=g).tolist() for n in (24, 9, 17)]]
    ok = True
    for policy, budget, mode in (("resident", None, "gpu"), ("lru", "25%", "gpu"), ("lru", "25%", "cpu"),
                                 ("lru", "25%", "auto")):
        for prompts in batches:
            out = {}
            for graphs in (False, True):
                engine.reconfigure(policy, budget, cuda_graphs=graphs, miss_compute=mode)
                run(engine, prompts, 4)                      # warm-up (and capture)
                engine.reconfigure(policy, budget, cuda_graphs=graphs, miss_compute=mode)
                out[graphs] = run(engine, prompts, 12)
            same = out[False] == out[True]
            ok &= same
            print(f"  tokens equal: {out[False][0] == out[True][0]}; "
                  f"eager {out[False][0][0][:12]} graphs {out[True][0][0][:12]}")
            print(f"{policy:8s} {mode:4s} batch {len(prompts)}: eager {out[False][1]} bytes {out[False][2]} | graphs "
                  f"{out[True][1]} bytes {out[True][2]} | same tokens and counts: {same}  [{engine.decode_path}]")
    print("ALL SAME" if ok else "DIFFERENT")


if __name__ == "__main__":
    main()

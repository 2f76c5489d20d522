"""Engine-thread time of the FineMoE policy per iteration (issue 3, "off the critical path").

Drives the policy's callbacks in the engine's order (iteration start; per layer on_access, on_layer_routed,
select_victims; iteration end) with a full map store of C entries and synthetic router softmaxes at a
chosen geometry (default: Qwen1.5-MoE-shaped, J=60, top-4, E=2048), batch 1 decode, and reports the
policy's own `critical_s / iterations` (all engine-thread time spent in its callbacks). With
`--async` the search runs on the worker thread (the CUDA structure), else inline; `--layer-ms` models the
device computing each layer between callbacks (the engine thread waits on its per-layer sync there, and
the worker runs). `--profile` prints a cProfile of the engine thread.

    python3 benchmarks/finemoe_critical_path.py --layers 12 24 --async both
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time

import numpy as np
import torch

from finemoe.models.adapters import ExpertGeometry
from finemoe.policies.base import CacheView, IterationInfo, LayerRouting, PolicyContext, RequestInfo
from finemoe.policies.finemoe.policy import FineMoEPolicy


def synthetic_probs(rng: np.random.Generator, n: int, L: int, J: int) -> torch.Tensor:
    """n iterations of L router softmaxes over J experts with a few favoured experts -> [n, L, J]."""
    logits = rng.normal(0.0, 1.0, (n, L, J)) + 3.0 * (rng.random((n, L, J)) < 0.08)
    return torch.softmax(torch.from_numpy(logits).float(), dim=-1)


def make_policy(L: int, J: int, E: int, C: int, vocab: int, use_thread: bool, seed: int):
    geo = ExpertGeometry(L, J, 4, 1, {"w": (1,)}, torch.float32)
    embed = torch.nn.Embedding(vocab, E)
    policy = FineMoEPolicy(learn=False, capacity=C)   # the search runs inline (use_thread: no longer an option)
    ctx = PolicyContext(geo, CacheView(np.zeros(L * J, dtype=bool), L * J // 4), torch.device("cpu"),
                        embed=embed, model_name="synthetic")
    policy.bind(ctx)
    rng = np.random.default_rng(seed)
    maps = synthetic_probs(rng, C, L, J).reshape(C, L * J)
    with torch.no_grad():
        sems = embed(torch.from_numpy(rng.integers(0, vocab, C)))
    policy.store.add_many(maps, sems)
    return policy


@torch.inference_mode()
def drive(policy: FineMoEPolicy, iterations: int, seed: int, layer_s: float = 0.0) -> None:
    L, J, k = policy.L, policy.J, policy.top_k
    rng = np.random.default_rng(seed + 1)
    probs = synthetic_probs(rng, iterations, L, J)                              # [n, L, J]
    tokens = rng.integers(0, policy.ctx.embed.num_embeddings, iterations)
    req = RequestInfo("r0", [int(tokens[0])])
    policy.on_request_start(req)
    candidates = np.arange(L * J // 4, dtype=np.int64)
    rows = np.zeros(1, np.int64)
    for i in range(iterations):
        it = IterationInfo(i, ["r0"], [i + 1], torch.tensor([[int(tokens[i])]]), False)
        policy.on_iteration_start(it)
        for layer in range(L):
            p = probs[i, layer][None]                                            # [1, J]
            top = torch.topk(p, k).indices                                       # [1, k]
            experts = np.sort(top[0].numpy())
            policy.on_access(layer, experts, np.ones(k, np.int64))
            policy.on_layer_routed(LayerRouting(layer, top, rows, p))
            policy.select_victims(candidates, 2, True)
            if layer_s:
                time.sleep(layer_s)                                              # the device computing the layer
        policy.on_iteration_end(it)
    policy.on_request_end(req)


def measure(L: int, use_thread: bool, args) -> dict:
    policy = make_policy(L, args.experts, args.embed_dim, args.capacity, args.vocab, use_thread, args.seed)
    drive(policy, 4, args.seed)                                                  # warm-up
    per_it = []
    prof = cProfile.Profile() if args.profile else None
    for rep in range(args.repeat):
        policy.critical_s, policy.iterations = 0.0, 0
        if prof is not None and rep == args.repeat - 1:
            prof.enable()
        drive(policy, args.iterations, args.seed + rep, args.layer_ms / 1e3)
        if prof is not None and rep == args.repeat - 1:
            prof.disable()
        per_it.append(1e3 * policy.critical_s / policy.iterations)
    policy.close()
    if prof is not None:
        print(f"--- cProfile, L={L}, worker={use_thread}", file=sys.stderr)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
    return {"layers": L, "worker_thread": use_thread, "layer_ms": args.layer_ms, "critical_ms_per_iteration_median": statistics.median(per_it),
            "critical_ms_per_iteration_min": min(per_it)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    ap.add_argument("--experts", type=int, default=60)
    ap.add_argument("--embed-dim", type=int, default=2048)
    ap.add_argument("--capacity", type=int, default=1000)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--iterations", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--async", dest="mode", choices=["true", "false", "both"], default="both")
    ap.add_argument("--layer-ms", type=float, default=2.0,
                    help="modelled device time per layer between callbacks (H100, Qwen shape: 25.7 ms / 12 layers)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = {"true": [True], "false": [False], "both": [False, True]}[args.mode]
    rows = [measure(L, m, args) for L in args.layers for m in modes]
    for r in rows:
        print(f"L={r['layers']:3d} worker={str(r['worker_thread']):5s} policy engine-thread ms/iteration: "
              f"median {r['critical_ms_per_iteration_median']:.3f}  min {r['critical_ms_per_iteration_min']:.3f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""docs/FINEMOE.md, "Measured: search cost". Times FineMoE map-store operations (host float32 store, compiled
search): semantic search, one trajectory step (per layer, with its plan), a whole iteration of trajectory steps,
and an RDY insertion into a full store.

    python3 benchmarks/finemoe_search.py              # table + JSON

Default geometry is Qwen1.5-MoE-A2.7B's: L=24 MoE layers, J=60 experts, E=2048 (token embedding).
Stores are filled with random softmax maps (search cost does not depend on the values).
"""
from __future__ import annotations

import argparse
import json

import torch

import numpy as np

from benchmarks_common import median_seconds
from finemoe.policies.finemoe.eviction import EvictionScores
from finemoe.policies.finemoe.map_store import MapStore, StoreSpec
from finemoe.policies.finemoe.planner import IterationPlanner
from finemoe.policies.finemoe.search import semantic_topk
from finemoe.policies.finemoe.selection import Selection


def filled(C: int, L: int, J: int, E: int, d: int) -> MapStore:
    store = MapStore(StoreSpec("bench", L, J, E, "token", d, C))
    g = torch.Generator().manual_seed(0)
    maps = torch.softmax(torch.randn(C, L, J, generator=g) * 3, dim=-1).reshape(C, L * J)
    for m, s in zip(maps, torch.randn(C, E, generator=g)):
        store.add(m, s)
    return store


def measure(C, L, J, E, d, B, repeat) -> dict:
    store = filled(C, L, J, E, d)
    q_sem = torch.randn(B, E).numpy()
    q_layer = torch.softmax(torch.randn(B, J), dim=-1).numpy()
    new_map, new_sem = torch.softmax(torch.randn(L, J), -1).reshape(-1), torch.randn(E)

    def planner():
        return IterationPlanner(store, B, d, "trajectory", 4, 0, False, Selection(4), 0, np.zeros(L * J, bool),
                                EvictionScores(L * J, J).state)

    def trajectory_iteration():
        search = planner()
        for layer in range(L - d):
            search.observe(layer, q_layer)

    step = planner()
    return {"C": C, "B": B,
            "semantic_ms": 1e3 * median_seconds(lambda: semantic_topk(store, q_sem, 4), repeat),
            "trajectory_step_ms": 1e3 * median_seconds(lambda: step.observe(L // 2, q_layer), repeat),
            "trajectory_iteration_ms": 1e3 * median_seconds(trajectory_iteration, max(3, repeat // 5)),
            "rdy_insert_ms": 1e3 * median_seconds(lambda: store.add(new_map, new_sem), repeat),
            "store_mib": (store.maps.numel() + store.sems.numel()) * 4 / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capacities", type=int, nargs="+", default=[1000, 10000, 32000])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--experts", type=int, default=60)
    p.add_argument("--embed-dim", type=int, default=2048)
    p.add_argument("--distance", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(C, args.layers, args.experts, args.embed_dim, args.distance, B, args.repeat)
            for C in args.capacities for B in args.batch]
    print(f"torch threads {torch.get_num_threads()}, L={args.layers} J={args.experts} "
          f"E={args.embed_dim} d={args.distance} (median ms)")
    print(f"{'C':>6} {'B':>3} {'semantic':>9} {'traj step':>10} {'traj iter':>10} {'rdy add':>9} {'MiB':>7}")
    for r in rows:
        print(f"{r['C']:>6} {r['B']:>3} {r['semantic_ms']:9.3f} {r['trajectory_step_ms']:10.3f} "
              f"{r['trajectory_iteration_ms']:10.2f} {r['rdy_insert_ms']:9.3f} {r['store_mib']:7.1f}")
    print(json.dumps({"config": vars(args), "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""docs/FINEMOE.md, "Measured: search cost" (CPU and GPU tables). Times FineMoE map-store operations on one device:
semantic search, one trajectory-search step (per layer), a whole iteration of trajectory steps, and an RDY insertion
into a full store.

    python3 benchmarks/finemoe_search.py --device cpu              # CPU table + JSON
    python3 benchmarks/finemoe_search.py --device cuda             # GPU (synchronised timings)

Default geometry is Qwen1.5-MoE-A2.7B's: L=24 MoE layers, J=60 experts, E=2048 (token embedding).
Stores are filled with random softmax maps (search cost does not depend on the values).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from finemoe.policies.finemoe.map_store import DTYPES, MapStore, StoreSpec
from finemoe.policies.finemoe.search import TrajectorySearch, semantic_search


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` runs (device synchronised around each)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def filled(C: int, L: int, J: int, E: int, d: int, dtype: torch.dtype, device: torch.device) -> MapStore:
    store = MapStore(StoreSpec("bench", L, J, E, "token", d, C), dtype, device)
    g = torch.Generator().manual_seed(0)
    maps = torch.softmax(torch.randn(C, L, J, generator=g) * 3, dim=-1).reshape(C, L * J)
    store._write(slice(0, C), maps, torch.randn(C, E, generator=g))
    store.size = C
    return store


def measure(C, L, J, E, d, B, dtype_name, device, repeat) -> dict:
    store = filled(C, L, J, E, d, DTYPES[dtype_name], device)
    q_sem = torch.randn(B, E, device=device)
    q_layer = torch.softmax(torch.randn(B, J, device=device), dim=-1)
    new_map, new_sem = torch.softmax(torch.randn(L, J), -1).reshape(-1), torch.randn(E)

    def trajectory_iteration():
        search = TrajectorySearch(store, B)
        for layer in range(L - d):
            search.observe(layer, q_layer)

    step = TrajectorySearch(store, B)
    return {"C": C, "B": B, "dtype": dtype_name, "device": str(device),
            "semantic_ms": 1e3 * timed(lambda: semantic_search(store, q_sem), device, repeat),
            "trajectory_step_ms": 1e3 * timed(lambda: step.observe(L // 2, q_layer), device, repeat),
            "trajectory_iteration_ms": 1e3 * timed(trajectory_iteration, device, max(3, repeat // 5)),
            "rdy_insert_ms": 1e3 * timed(lambda: store.add(new_map, new_sem), device, repeat),
            "store_mib": (store.maps.numel() * store.maps.element_size()
                          + store.sems.numel() * store.sems.element_size()) / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--capacities", type=int, nargs="+", default=[1000, 10000, 32000])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=list(DTYPES))
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
    device = torch.device(args.device)
    rows = [measure(C, args.layers, args.experts, args.embed_dim, args.distance, B, dt, device, args.repeat)
            for C in args.capacities for dt in args.dtypes for B in args.batch]
    print(f"device {device}, torch threads {torch.get_num_threads()}, L={args.layers} J={args.experts} "
          f"E={args.embed_dim} d={args.distance} (median ms)")
    print(f"{'C':>6} {'B':>3} {'dtype':>8} {'semantic':>9} {'traj step':>10} {'traj iter':>10} {'rdy add':>9} "
          f"{'MiB':>7}")
    for r in rows:
        print(f"{r['C']:>6} {r['B']:>3} {r['dtype']:>8} {r['semantic_ms']:9.3f} {r['trajectory_step_ms']:10.3f} "
              f"{r['trajectory_iteration_ms']:10.2f} {r['rdy_insert_ms']:9.3f} {r['store_mib']:7.1f}")
    print(json.dumps({"config": vars(args), "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

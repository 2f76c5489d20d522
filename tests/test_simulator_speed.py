"""Simulator speed: the replay's fused demand path (`ExpertCache.acquire_release`) is exactly the engine's
`acquire` + `release`, and a real routing trace replays in seconds on a CPU."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from conftest import load_benchmark, require_shared
from finemoe.experts.cache import ExpertCache
from finemoe.models.adapters import ExpertGeometry
from finemoe.policies import create_policy
from finemoe.policies.base import PolicyContext, Prefetch
from finemoe.simulator import CostModel, TimedTransport, simulate
from finemoe.traces import load_trace

L, J, CAPACITY = 3, 8, 6


def timed_cache(policy_name: str) -> tuple[ExpertCache, object, TimedTransport]:
    g = ExpertGeometry(L, J, 2, 10, {"w": (2, 2)}, torch.float32)
    transport = TimedTransport(CAPACITY, CostModel(expert_bytes=10, bandwidth_Bps=10.0))   # 1 s per copy
    policy = create_policy(policy_name)
    cache = ExpertCache(g.total_experts, J, CAPACITY, transport, policy, prefetch_inflight=2)
    policy.bind(PolicyContext(g, cache.view(), torch.device("cpu")))
    return cache, policy, transport


def replay(fused: bool, policy_name: str, steps) -> list:
    """Drive one cache through layer accesses, prefetches and clock ticks; log everything observable."""
    cache, policy, transport = timed_cache(policy_name)
    log = []
    for layer, experts, prefetch_keys in steps:
        policy.on_access(layer, experts, np.ones_like(experts))
        if fused:
            hits = cache.acquire_release(layer, experts)
        else:
            res = cache.acquire(layer, experts)
            cache.release(res.slots)
            hits = int(res.hit.sum())
        cache.enqueue(Prefetch(prefetch_keys, np.arange(prefetch_keys.size, 0, -1, dtype=np.float64)))
        issued = cache.pump(layer)
        transport.advance(0.5)
        log.append((hits, issued, transport.now, transport.bytes_copied, cache.slot_of.tolist(),
                    cache.wasted_prefetches))
        if layer == L - 1:
            cache.end_iteration()
    return log


def test_fused_demand_path_equals_acquire_then_release_with_prefetches_in_flight():
    rng = np.random.default_rng(7)
    steps = []
    for i in range(300):
        layer = i % L
        experts = np.sort(rng.choice(J, size=int(rng.integers(1, 5)), replace=False)).astype(np.int64)
        later = np.arange((layer + 1) * J, L * J)
        prefetch_keys = rng.choice(later, size=min(3, later.size), replace=False).astype(np.int64)
        steps.append((layer, experts, prefetch_keys))
    for policy_name in ("lru", "lfu"):
        fused, plain = replay(True, policy_name, steps), replay(False, policy_name, steps)
        assert fused == plain
        assert sum(hits for hits, *_ in fused) > 0 and fused[-1][5] > 0    # hits and wasted prefetches happen


def test_flame_trace_replays_with_lru_in_seconds():
    """4 requests x 512 tokens x 8 layers (16k layer steps, about 77k demand copies) at 25%: about 0.15 s on
    the 2-core dev machine with the compiled cache (1 s with the Python one, 15-20 s before its fast paths).
    Bound: 20 s."""
    trace = load_trace(str(require_shared("data", "traces", "flame_moe_290m.npz")) + "#seq")
    t0 = time.perf_counter()
    (row,) = simulate(trace, ["lru"], ["25%"], CostModel(17301504, 25e9, 0.3e-3))
    assert time.perf_counter() - t0 < 20.0
    assert (row["hits"], row["misses"]) == (21555, 76749)       # the counts the original code gave


@pytest.mark.parametrize("policy", ["lru", "lfu", "deepspeed"])
def test_two_thousand_requests_replay_in_seconds(policy):
    """FLAME's 64 short requests repeated 32 times: 2,048 requests, 163,840 layer steps, about 780k demand
    copies at 25%. The compiled cache replays them in 1.6-2.5 s per policy on the 2-core dev machine (the
    Python cache before it needed about 3x as long). Bound: 15 s."""
    repeated = load_benchmark("sim_speed").repeated
    trace = repeated(load_trace(str(require_shared("data", "traces", "flame_moe_290m.npz")) + "#first10"), 32)
    t0 = time.perf_counter()
    (row,) = simulate(trace, [policy], ["25%"], CostModel(17301504, 25e9, 0.3e-3))
    assert time.perf_counter() - t0 < 15.0
    assert trace.num_requests == 2048 and row["hits"] + row["misses"] > 900_000


def test_sim_speed_compares_two_source_trees_in_fresh_processes(tmp_path):
    """benchmarks/sim_speed.py --baseline-src: before/after CPU seconds, each version in its own process."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    trace = require_shared("data", "traces", "flame_moe_290m.npz")
    out = tmp_path / "cmp.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "sim_speed.py"), "--trace", f"{trace}#seq", "--repeat", "1",
                    "--policy", "lru", "--baseline-src", str(root / "src"), "--rounds", "1", "--out", str(out)],
                   check=True, capture_output=True, cwd=tmp_path)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["policy"] == "lru" and row["baseline_cpu_s"] > 0 and row["current_cpu_s"] > 0
    assert row["ratio"] == row["current_cpu_s"] / row["baseline_cpu_s"]

"""Simulator speed: a real routing trace replays in seconds on a CPU."""
from __future__ import annotations

import time

import pytest

from conftest import load_benchmark, require_shared
from finemoe.simulator import CostModel, simulate
from finemoe.traces import load_trace


def test_flame_trace_replays_with_lru_in_seconds():
    """4 requests x 512 tokens x 8 layers (16k layer steps, about 77k demand copies) at 25%: about 0.15 s on
    the 2-core dev machine. Bound: 20 s."""
    trace = load_trace(str(require_shared("data", "traces", "flame_moe_290m.npz")) + "#seq")
    t0 = time.perf_counter()
    (row,) = simulate(trace, ["lru"], ["25%"], CostModel(17301504, 25e9, 0.3e-3), {"lru": {"order": "recency"}})
    assert time.perf_counter() - t0 < 20.0
    assert (row["hits"], row["misses"]) == (21555, 76749)       # the counts the original code gave (classic LRU)


@pytest.mark.parametrize("policy", ["lru", "lfu", "deepspeed"])
def test_two_thousand_requests_replay_in_seconds(policy):
    """FLAME's 64 short requests repeated 32 times: 2,048 requests, 163,840 layer steps, about 780k demand
    copies at 25%. They replay in 1.6-2.5 s per policy on the 2-core dev machine. Bound: 15 s."""
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
    subprocess.run([sys.executable, str(root / "benchmarks" / "sim_speed.py"), "--trace", f"{trace}#seq",
                    "--repeat", "1",
                    "--policy", "lru", "--baseline-src", str(root / "src"), "--rounds", "1", "--out", str(out)],
                   check=True, capture_output=True, cwd=tmp_path)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["policy"] == "lru" and row["baseline_cpu_s"] > 0 and row["current_cpu_s"] > 0
    assert row["ratio"] == row["current_cpu_s"] / row["baseline_cpu_s"]

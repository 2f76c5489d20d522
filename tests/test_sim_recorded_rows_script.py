"""benchmarks/sim_recorded_rows.py re-runs the simulator's prediction of every row of an offload_gpu.py result from
the costs it records: here a hand-made result over a small synthetic trace. Each row is replayed with the CPU cost
scale the engine's split had when the row started (carried from the previous cpu/auto row), and cpu/auto rows also
with the engine's measured CPU time per expert."""
from __future__ import annotations

import json

import numpy as np

from conftest import load_benchmark
from test_offload_gpu_script import synthetic_trace

COSTS = {"copy_s": 1e-3, "cpu_s": 2e-3, "cpu_token_s": 1e-4, "cpu_fixed_s": 1e-4}


def row(policy, mode, dtype, start, end, tpot_s=0.02, issue="idle"):
    hybrid = mode != "gpu"
    return {"policy": policy, "budget": "25%", "prefetch_issue": issue, "mode": mode, "cpu_dtype_choice": dtype,
            "tpot_s": tpot_s, "sim_tpot_s": 0.015, "cpu_experts_per_token": 2.0 if hybrid else 0.0,
            "cpu_start_ms_per_token": 0.5 if hybrid else 0.0, "cpu_wait_ms_per_token": 0.1 if hybrid else 0.0,
            "cpu_compute_ms_per_token": 3.4 if hybrid else 0.0, "cpu_cost_scale_start": start,
            "cpu_cost_scale_end": end}


def test_start_scales_carry_from_row_to_row_and_restart_with_the_dtype():
    bench = load_benchmark("sim_recorded_rows")
    rows = [row("lru", "gpu", None, None, None), row("lru", "auto", "auto", 1.5, 1.5),
            row("lru", "gpu", None, None, None), row("lru", "auto", "auto", 3.0, 2.0),
            row("lru", "auto", "float32", 2.0, 4.0), row("lru", "cpu", "float32", 9.0, 5.0)]
    assert bench.start_scales(rows) == [None, 1.5, None, 1.5, 1.0, 4.0]
    assert bench.measured_cpu_s(rows[1]) == (0.5 + 0.1 + 3.4) / 2.0 / 1e3


def test_every_row_is_replayed_with_calibrated_and_measured_cpu_costs(tmp_path, capsys):
    bench = load_benchmark("sim_recorded_rows")
    rows = [row("lru", "gpu", None, None, None), row("lru", "auto", "auto", 1.0, 2.0),
            row("moe-infinity", "gpu", None, None, None, issue="off"),
            row("moe-infinity", "auto", "auto", 2.0, 3.0, issue="off")]
    result = {"expert_bytes": 1000, "layer_time_ms": 0.4, "host_layer_ms": 0.1,
              "policy_layer_ms": {"lru": 0.0, "moe-infinity": 0.0}, "build_requests": 3, "eval_requests": 3,
              "calibrations": {"auto": {"costs": COSTS}}, "rows": rows}
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    out = tmp_path / "rows.json"
    report = bench.main(["--results", str(path), "--trace", synthetic_trace(tmp_path / "t.safetensors"),
                         "--split", "0.5", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    got = report["rows"]
    assert [(r["policy"], r["mode"]) for r in got] == [(r["policy"], r["mode"]) for r in rows]
    assert [r["cpu_cost_scale_at_start"] for r in got] == [None, 1.0, None, 2.0]
    for r in got:
        assert r["calibrated"]["tpot_s"] > 0 and np.isfinite(r["calibrated"]["error"])
        if r["mode"] == "gpu":
            assert "measured" not in r and r["calibrated"]["cpu_experts_per_token"] == 0
        else:
            assert r["measured_cpu_ms_per_expert"] == 2.0 and r["measured"]["tpot_s"] > 0
    assert "measured CPU cost" in capsys.readouterr().out.splitlines()[-5]


def test_rows_run_their_recorded_policy_options_and_legacy_lru_rows_the_classic_rule():
    bench = load_benchmark("sim_recorded_rows")
    assert bench.row_policy({"policy": "lru"}) == ("lru", {"order": "recency"})       # recorded before options
    assert bench.row_policy({"policy": "finemoe"}) == ("finemoe", {})
    assert bench.row_policy({"policy": "lru/order=cycle", "policy_name": "lru",
                             "policy_options": {"order": "cycle"}}) == ("lru", {"order": "cycle"})
    assert bench.row_policy({"policy": "lru", "policy_name": "lru", "policy_options": {}}) == ("lru", {})

"""benchmarks/batch_step.py (a batch-8 decode step at 25%, issue 22's thrash target) runs on the CPU with tiny widths
and reports every policy's hit rate and bytes per step; the step time that matters comes from the GPU."""
from __future__ import annotations

from conftest import load_benchmark


def test_tiny_cpu_run_reports_each_policy(tmp_path):
    bench = load_benchmark("batch_step")
    result = bench.main(["--device", "cpu", "--tiny", "--layers", "3", "--batch", "4", "--prompt-len", "8",
                         "--new-tokens", "3", "--policies", "lru,finemoe", "--out", str(tmp_path / "b.json")])
    assert [r["policy"] for r in result["rows"]] == ["resident", "lru", "finemoe"]
    resident = result["rows"][0]
    assert resident["hit_rate"] == 1.0 and resident["mb_per_step"] == 0.0
    assert all(0.0 <= r["hit_rate"] <= 1.0 and r["mb_per_step"] > 0 for r in result["rows"][1:])


def test_auto_mode_rows_compute_some_misses_on_the_cpu(tmp_path):
    bench = load_benchmark("batch_step")
    result = bench.main(["--device", "cpu", "--tiny", "--layers", "2", "--batch", "4", "--prompt-len", "8",
                         "--new-tokens", "3", "--policies", "lru", "--modes", "gpu,cpu", "--cpu-threads", "1"])
    assert [(r["policy"], r["mode"]) for r in result["rows"]] == [("resident", "gpu"), ("lru", "gpu"), ("lru", "cpu")]
    gpu, cpu = result["rows"][1:]
    assert gpu["cpu_experts_per_step"] == 0.0 and cpu["cpu_experts_per_step"] > 0 and cpu["mb_per_step"] == 0.0

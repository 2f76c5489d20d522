"""benchmarks/check_continuous_gpu.py (continuous batching against plain transformers on the GPU) runs on the CPU with
tiny widths; in fp32 there both its modes are exact. The numbers that matter come from the GPU run."""
from __future__ import annotations

import json

from conftest import load_benchmark


def test_tiny_cpu_run_is_exact_in_both_modes(tmp_path):
    bench = load_benchmark("check_continuous_gpu")
    out = tmp_path / "continuous.json"
    result = bench.main(["--device", "cpu", "--tiny", "--layers", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert [(r["mode"], r["policy"]) for r in result["rows"]] == [
        (m, p) for m in ("alone", "staggered") for p in ("resident", "lru", "finemoe")]
    assert result["alone_exact"] and result["offload_equals_resident"]
    for r in result["rows"]:
        assert r["requests_exact"] == r["requests_exact_at_engine_kv"] == r["requests_exact_vs_resident"] == 4
        assert r["token_agreement"] == 1.0 and r["first_diff"] == [None] * 4


def test_first_difference_and_comparison():
    bench = load_benchmark("check_continuous_gpu")
    assert bench.first_diff([1, 2, 3], [1, 2, 3]) is None and bench.first_diff([1, 5, 3], [1, 2, 3]) == 1
    assert bench.first_diff([1, 2], [1, 2, 3]) == 2
    cmp = bench.compare([[1, 2], [3, 4]], [[1, 2], [3, 5]], "_x")
    assert cmp == {"requests_exact_x": 1, "token_agreement_x": 0.75}

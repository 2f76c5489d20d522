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
    assert result["alone_exact"]
    assert all(r["requests_exact"] == r["requests"] == 4 and r["token_agreement"] == 1.0 for r in result["rows"])

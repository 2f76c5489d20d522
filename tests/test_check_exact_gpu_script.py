"""benchmarks/check_exact_gpu.py checks greedy tokens of every policy against plain transformers' static-cache
step on the GPU (docs/BENCHMARKS.md). Here its CPU smoke mode: the same comparison on a tiny fp32 model."""
from __future__ import annotations

import json

from conftest import load_benchmark


def test_every_policy_row_is_compared_at_batch_1_and_batched(tmp_path):
    bench = load_benchmark("check_exact_gpu")
    out = tmp_path / "exact.json"
    result = bench.main(["--tiny", "--device", "cpu", "--layers", "2", "--prompt-len", "8", "--new-tokens", "6",
                         "--batch", "2", "--budgets", "25%", "--policies", "lru,finemoe/neighbors=1,promoe",
                         "--out", str(out)])
    rows = [(r["policy"], r["budget"], r["batch"]) for r in result["rows"]]
    assert rows == [("resident", "100%", 1), ("resident", "100%", 2), ("lru", "25%", 1), ("lru", "25%", 2),
                    ("finemoe/neighbors=1", "25%", 1), ("finemoe/neighbors=1", "25%", 2),
                    ("promoe", "25%", 1), ("promoe", "25%", 2)]
    assert result["all_exact"] and all(r["rows_exact"] == r["batch"] for r in result["rows"])
    assert json.loads(out.read_text())["rows"] == result["rows"]

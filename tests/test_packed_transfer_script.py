"""benchmarks/packed_transfer_gpu.py (plain against packed expert copies in the engine) in its CPU smoke mode: both
engines serve the same requests with the same hits and bit-equal logits; the timings that matter come from the
GPU."""
from __future__ import annotations

import json

from conftest import load_benchmark
from test_offload_gpu_script import synthetic_trace


def test_packed_transfer_smoke_rows_match_the_plain_engine(tmp_path):
    bench = load_benchmark("packed_transfer_gpu")
    out = tmp_path / "packed.json"
    result = bench.main(["--trace", synthetic_trace(tmp_path / "t.safetensors"), "--device", "cpu", "--tiny",
                         "--split", "0.5", "--eval-limit", "2", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert [r["policy"] for r in result["rows"]] == ["lru", "finemoe"]
    for r in result["rows"]:
        assert r["same_hits"] and r["logits_bit_equal"] and r["bytes_ratio"] < 0.8
        assert r["plain"]["compiles_while_serving"] == r["packed"]["compiles_while_serving"] == 0
    assert result["host_expert_bytes"]["packed"] < 0.8 * result["host_expert_bytes"]["plain"]

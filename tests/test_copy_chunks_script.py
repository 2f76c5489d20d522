"""benchmarks/copy_chunks.py (copy throughput vs chunk size; a demand copy's latency behind prefetches) in its CPU
smoke mode: the numbers that matter come from the GPU host; this checks what the script reports."""
from __future__ import annotations

import json

from conftest import load_benchmark


def test_copy_chunks_smoke_reports_every_chunk_size_and_both_rules(tmp_path, capsys):
    bench = load_benchmark("copy_chunks")
    out = tmp_path / "chunks.json"
    assert bench.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    sizes = [r["chunk_bytes"] for r in result["chunks"]]
    assert sizes == sorted(sizes) and sizes[-1] <= result["expert_bytes"] and all(s % 256 == 0 for s in sizes)
    assert len(sizes) == 6
    assert all(r["GBps"] > 0 and r["demand_ms_behind_one_chunk"] > 0 for r in result["chunks"])
    assert result["demand_ms_behind_inflight"] > 0 and result["whole_copy_GBps"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| ")     # the table last

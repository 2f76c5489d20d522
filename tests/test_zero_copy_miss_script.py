"""benchmarks/zero_copy_miss.py (docs/BENCHMARKS.md: serve a missed expert by copy-then-compute or by zero-copy
reads) runs on the CPU in --dry-run: tiny shapes, the same math paths as on the GPU, and the JSON it writes.
The GPU numbers themselves come from the device run; these tests pin down the script's arithmetic and checks."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("zero_copy_miss")


def test_dry_run_measures_every_method_and_writes_the_json(bench, tmp_path):
    out = tmp_path / "zero_copy.json"
    result = bench.main(["--dry-run", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and saved["dry_run"] is True
    assert {"device", "torch", "commit", "expert_bytes", "spin_ms"} <= saved.keys()
    assert saved["expert_bytes"] == 3 * 128 * 64 * 2          # gate_up [2*64, 128] + down [128, 64], bf16
    timed = {(r["method"], r["span"], r["m"], r["experts"]) for r in saved["rows"]}
    for n in (1, 4):
        assert ("h2d_copy", "result", None, n) in timed
        for m in (1, 4, 16):
            for method in ("copy_then_compute", "zero_copy", "resident"):
                assert (method, "result", m, n) in timed
            assert {("zero_copy+copy", "result", m, n), ("zero_copy+copy", "both", m, n)} <= timed
    assert all(r["reps"] == 3 and r["median_ms"] > 0 for r in saved["rows"])
    assert len(saved["correctness"]) == 3 * 3 * 2              # 3 methods x 3 M x 2 expert counts
    assert all(c["max_abs_diff"] < 1e-2 for c in saved["correctness"])
    assert all(a["seen"] == a["probe"] for a in saved["alias_check"].values())


def test_expert_mlp_is_the_transformers_v5_expert(bench):
    """The benchmark times the very computation transformers runs for one routed expert (fused gate_up, gate first)."""
    cfg = Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=3, hidden_act="silu")
    experts = Qwen2MoeExperts(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
        x = torch.randn(5, 32)
        want = experts(x, torch.full((5, 1), 2), torch.ones(5, 1))
        got = bench.expert_mlp(x, experts.gate_up_proj[2], experts.down_proj[2])
    torch.testing.assert_close(got, want)


def test_a_view_that_is_a_copy_fails_the_alias_check(bench):
    host = torch.randn(4, 8).to(torch.bfloat16)
    assert bench.check_alias(host, host, lambda: None)["seen"] == -3.25
    with pytest.raises(bench.ZeroCopyError, match="it is a copy"):
        bench.check_alias(host, host.clone(), lambda: None)


def test_without_cuda_the_full_run_names_the_fix(bench):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full run would start")
    with pytest.raises(bench.ZeroCopyError, match="--dry-run"):
        bench.main([])

"""benchmarks/cpu_expert_cost.py (a cold expert's CPU time per kernel against its copy) in its CPU smoke mode: the
numbers that matter come from the GPU host; this checks what the script reports."""
from __future__ import annotations

import importlib.util
import json

from conftest import load_benchmark


def test_cpu_expert_cost_smoke_reports_every_kernel_tokens_and_threads(tmp_path, capsys):
    bench = load_benchmark("cpu_expert_cost")
    out = tmp_path / "cost.json"
    assert bench.main(["--device", "cpu", "--tiny", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    kernels = {"torch-bf16", "torch-fp32", "torch-fp16", "torch-bf16-nomkldnn"}
    if importlib.util.find_spec("kt_kernel") is not None:
        kernels.add("kt-kernel-bf16")
    assert set(result["cpu_s"]) == kernels and result["kt_kernel"] == ("kt-kernel-bf16" in kernels)
    assert all(set(by) == {"threads1/tokens1", "threads1/tokens4", "threads1/tokens16"} and min(by.values()) > 0
               for by in result["cpu_s"].values())
    assert result["rel_error_vs_torch_fp32"]["torch-fp32"] == 0.0
    assert all(e < 3e-2 for e in result["rel_error_vs_torch_fp32"].values())       # bf16/fp16 rounding at most
    assert result["experts_cycled"] == 4 and "copy_1_s" not in result                # no copies on --device cpu
    assert set(result["cpu"]["flags"]) >= {"amx_bf16", "avx512_bf16", "avx2"} and "model_name" in result["cpu"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].split()[0] in kernels and lines[-len(kernels) - 1].startswith("kernel")   # the table last

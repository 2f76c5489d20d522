"""benchmarks/multi_gpu.py (issue 25) in its CPU smoke mode: the built-in tiny model, two slot pools on the CPU
standing in for two GPUs. The numbers that matter come from a two-GPU run."""
from __future__ import annotations

import json

from conftest import load_benchmark


def test_tiny_cpu_run(tmp_path, capsys):
    out = tmp_path / "multi_gpu.json"
    result = load_benchmark("multi_gpu").main(["--device", "cpu", "--tiny", "--prompts", "2", "--prompt-tokens",
                                               "5", "--new-tokens", "4", "--repeat", "2", "--out", str(out)])
    assert json.loads(out.read_text())["rows"][0]["config"] == "1 GPU"
    one, double, primary, split = result["rows"]
    assert [r["config"] for r in result["rows"]] == ["1 GPU", "1 GPU", "2 GPUs primary", "2 GPUs split"]
    assert [r["budget_per_device"] for r in result["rows"]] == ["25%", "50%", "25%", "25%"]
    assert primary["cache_slots"] == split["cache_slots"] == double["cache_slots"] == 2 * one["cache_slots"]
    assert one["peer_copies_per_token"] == 0 < primary["peer_copies_per_token"]
    assert split["peer_copies_per_token"] > 0
    assert set(primary["layer_devices"]) == {0} and set(split["layer_devices"]) == {0, 1}
    assert (primary["non_expert_placement"], split["non_expert_placement"]) == ("primary", "split")
    assert one["non_expert_placement"] is None                       # one device: no placement over devices
    assert result["memory_plan"] is None and result["auto_choice"] is None   # the CPU: no memory plan, one device
    assert result["split_over_primary_tpot"] > 0
    assert result["two_gpu_tokens_equal_one_gpu"] is True
    assert result["copy_rates"]["host_copy_Bps"] > 0 and result["copy_rates"]["peer_copy_Bps"] > 0
    out = capsys.readouterr().out
    assert "2 GPUs split" in out and "split / primary TPOT on two GPUs" in out

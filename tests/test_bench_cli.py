"""`finemoe bench` on the built-in random model (tiny: 4 prompts, 3 new tokens), in both modes."""
from __future__ import annotations

import json

import pytest

from finemoe.cli.main import main

SCHEMA = {"policy", "expert_budget_bytes", "hits", "misses", "hit_rate", "bytes_copied", "bytes_per_token",
          "ttft_s", "tpot_s", "prefetch_distance", "mode"}
PROMPTS = ["hello there", "what is the capital of france", "write a short poem", "tell me a joke"]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


def _bench(capsys, prompts, out, *extra):
    code = main(["bench", "--prompts", prompts, "--max-new-tokens", "3", "--max-prompt-tokens", "16",
                 "--device", "cpu", "--split", "0.5", "--out", str(out), "--json", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out)["results"]


def _check_outputs(out, rows, n_held_out):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["held_out_prompts"] == n_held_out
    assert summary["meta"]["warm_up_s"] > 0                   # the engine warmed up before timing, reported apart
    assert [r["policy"] for r in summary["results"]] == [r["policy"] for r in rows]
    lines = (out / "requests.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + n_held_out * len(rows)          # header + one line per held-out request per row
    for png in ("hit_rate.png", "bytes_per_token.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_bench_simulate_rows_schema_and_files(capsys, prompts, tmp_path):
    out = tmp_path / "sim"
    rows = _bench(capsys, prompts, out, "--simulate", "--policies", "finemoe,lru,oracle,promoe",
                  "--expert-budget", "25%,50%", "--prefetch-distance", "1,2", "--expert-bytes", "1000000",
                  "--bandwidth", "10", "--layer-time-ms", "0.5")
    # finemoe and promoe x 2 distances x 2 budgets, lru and oracle x 2 budgets
    assert len(rows) == 12
    for r in rows:
        assert SCHEMA <= set(r)
        assert r["hits"] + r["misses"] > 0 and 0.0 <= r["hit_rate"] <= 1.0
    by = {(r["policy"], r["expert_budget"], r["prefetch_distance"]): r for r in rows}
    assert by[("promoe", "25%", 2)]["mode"] == "engine"            # speculative: cannot be simulated
    assert by[("finemoe", "25%", 1)]["mode"] == "simulate"
    assert by[("lru", "50%", None)]["expert_budget_bytes"] > by[("lru", "25%", None)]["expert_budget_bytes"]
    assert by[("oracle", "25%", None)]["misses"] <= by[("lru", "25%", None)]["misses"]
    assert by[("lru", "25%", None)]["tpot_s"] > 0                  # simulated clock: copies and layer time
    _check_outputs(out, rows, 2)
    assert (out / "tpot_s.png").exists()
    meta = json.loads((out / "summary.json").read_text())["meta"]   # the cost model is recorded with the rows
    assert (meta["bandwidth_GBps"], meta["layer_time_ms"], meta["host_layer_ms"]) == ("10", 0.5, 0.0)


def test_bench_engine_builds_history_and_reports_the_store(capsys, prompts, tmp_path):
    out = tmp_path / "eng"
    rows = _bench(capsys, prompts, out, "--engine", "--policies", "finemoe/eviction=lru,moe-infinity,lru")
    assert [r["mode"] for r in rows] == ["engine"] * 3
    fm = rows[0]
    assert fm["store_entries"] > 0 and fm["store_bytes"] > 0      # the store was built from the build split
    assert fm["bytes_copied"] == fm["experts_copied"] * (fm["expert_budget_bytes"] // fm["cache_slots"])
    _check_outputs(out, rows, 2)


def test_bench_rejects_bad_input(capsys, prompts, tmp_path):
    assert main(["bench", "--prompts", prompts, "--policies", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert main(["bench", "--prompts", prompts, "--split", "1.5", "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    assert main(["bench", "--prompts", prompts, "--cpu-expert-ms", "0.3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--cpu-expert-ms cost the simulator's CPU half: pass --simulate" in err

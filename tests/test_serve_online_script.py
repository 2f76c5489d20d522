"""benchmarks/serve_online.py (issue 22: next-batch admission against continuous batching under real arrival
times) runs on the CPU with the built-in tiny model, real prompts and real Azure arrivals, through both drivers:
the server's scheduler in-process, and a live `finemoe serve` over HTTP. The numbers that matter come from the
GPU run; here every run must complete every request and report its percentiles, hit rate and plots."""
from __future__ import annotations

import json

from conftest import load_benchmark, require_shared


def check_run(run: dict, requests: int) -> None:
    assert run["completed"] == run["requests"] == requests and not run["errors"]
    assert run["requests_per_s"] > 0 and 0 <= run["hit_rate"] <= 1
    for key in ("ttft_s", "tpot_s"):
        p = run[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"]
        assert len(run["samples"][key]) == requests


def test_inprocess_driver_compares_both_schedulings(tmp_path):
    bench = load_benchmark("serve_online")
    out, plots = tmp_path / "online.json", tmp_path / "plots"
    args = ["--device", "cpu", "--tiny", "--requests", "6", "--policies", "lru", "--driver", "inprocess",
            "--arrivals", str(require_shared("data", "workloads", "azure_conv.csv")),
            "--prompts", str(require_shared("data", "prompts", "lmsys_chat_64.jsonl")),
            "--out", str(out), "--plots", str(plots)]
    report = bench.main(args)
    saved = json.loads(out.read_text())
    assert saved["policies"][0]["runs"].keys() == {"next-batch", "continuous"}
    (policy,) = report["policies"]
    assert policy["capacity_requests_per_s"] > 0 and policy["batch1_tpot_s"] > 0
    arrivals = policy["arrivals_s"]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals) and len(arrivals) == 6
    for run in policy["runs"].values():
        check_run(run, 6)
        assert 0 <= run["queue_s"]["p50"] <= run["queue_s"]["p99"]
    assert sorted(p.name for p in plots.iterdir()) == ["online_tpot_cdf.png", "online_ttft_cdf.png"]


def test_http_driver_replays_against_a_live_server(tmp_path):
    bench = load_benchmark("serve_online")
    report = bench.main(["--device", "cpu", "--tiny", "--requests", "4", "--policies", "lru", "--driver", "http",
                         "--scheduling", "continuous", "--batch1-requests", "1",
                         "--arrivals", str(require_shared("data", "workloads", "azure_code.csv")),
                         "--prompts", str(require_shared("data", "prompts", "arena_hard_v01.jsonl"))])
    run = report["policies"][0]["runs"]["continuous"]
    check_run(run, 4)
    assert run["queue_mean_s"] >= 0

"""benchmarks/offload_gpu.py (issue 21: miss compute x prefetch issue x budgets, with the simulator's prediction of
every row) runs on the CPU with tiny widths and a small synthetic trace of Qwen1.5-MoE's expert count: every
row, the agreement and simulator columns and the calibrations are in its JSON. The numbers that matter come from
the H100 run."""
from __future__ import annotations

import json

import numpy as np

from conftest import load_benchmark
from finemoe.traces.format import Trace


def synthetic_trace(path, requests=6, layers=2, experts=60, top_k=4, prompt=3, new=4) -> str:
    rng = np.random.default_rng(0)
    per = prompt + new - 1
    tokens = requests * per
    logits = rng.normal(size=(tokens, layers, experts)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    topk = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
    Trace("synthetic", layers, experts, top_k, offsets=np.arange(requests + 1) * per,
          prompt_lens=np.full(requests, prompt), iterations=np.full(requests, new), token_ids=np.arange(tokens) % 50,
          topk=topk.astype(np.uint8), probs=probs.astype(np.float16)).save(str(path))
    return str(path)


def test_tiny_cpu_run_reports_every_row(tmp_path):
    bench = load_benchmark("offload_gpu")
    out = tmp_path / "offload.json"
    result = bench.main(["--trace", synthetic_trace(tmp_path / "t.safetensors"), "--device", "cpu", "--tiny",
                         "--split", "0.5", "--calibrate", "1", "--cpu-threads", "1", "--budgets", "25%,50%",
                         "--prefetch", "inflight,off", "--modes", "gpu,cpu,auto", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"]
    want = [(b, p, i, m) for b in ("25%", "50%") for p in ("lru", "moe-infinity", "finemoe")
            for i in (("inflight",) if p == "lru" else ("inflight", "off")) for m in ("gpu", "cpu", "auto")]
    assert [(r["budget"], r["policy"], r["prefetch_issue"], r["mode"]) for r in saved["rows"]] == want
    assert all(v > 0 for k, v in saved["calibrations"]["auto"]["costs"].items() if k != "cpu_token_s")
    for r in saved["rows"]:
        if r["mode"] == "cpu":      # every demand miss on the CPU (prefetching policies still copy prefetches)
            assert r["cpu_experts_per_token"] > 0 and (r["policy"] != "lru" or r["bytes_per_token"] == 0)
        if r["mode"] == "gpu":
            assert r["cpu_experts_per_token"] == 0
        else:                               # fp32 on the CPU: the CPU half is the device path's math
            assert r["token_agreement"] == 1.0 and r["max_rel_logit_error"] < 1e-3
        if r["prefetch_issue"] == "off":
            assert r["prefetch_copies"] == 0
        assert r["sim_tpot_s"] > 0 and np.isfinite(r["sim_error"])


def test_policy_variants_are_rows_of_their_own(tmp_path):
    bench = load_benchmark("offload_gpu")
    result = bench.main(["--trace", synthetic_trace(tmp_path / "t.safetensors"), "--device", "cpu", "--tiny",
                         "--split", "0.5", "--calibrate", "1", "--policies", "lru,lru/order=recency",
                         "--modes", "gpu", "--out", str(tmp_path / "o.json")])
    rows = [(r["policy"], r["policy_name"], r["policy_options"]) for r in result["rows"]]
    assert rows == [("lru", "lru", {}), ("lru/order=recency", "lru", {"order": "recency"})]
    for key in ("policy_layer_ms", "policy_serial_layer_ms", "policy_iteration_ms", "host_timing"):
        assert set(result[key]) == {"lru", "lru/order=recency"}     # each policy's host costs, for the simulator
    assert all(v >= 0 for key in ("policy_serial_layer_ms", "policy_iteration_ms") for v in result[key].values())


def test_profile_writes_one_host_profile_per_row(tmp_path, capsys):
    """--profile DIR: each row's serving under cProfile, saved as DIR/<row>.pstats and summarised on stdout."""
    import pstats
    bench = load_benchmark("offload_gpu")
    bench.main(["--trace", synthetic_trace(tmp_path / "t.safetensors"), "--device", "cpu", "--tiny",
                "--split", "0.5", "--calibrate", "1", "--policies", "lru,finemoe", "--prefetch", "off",
                "--modes", "gpu", "--profile", str(tmp_path / "prof"), "--out", str(tmp_path / "o.json")])
    files = sorted(p.name for p in (tmp_path / "prof").iterdir())
    assert files == ["finemoe-25_-off-gpu-.pstats", "lru-25_-off-gpu-.pstats"]
    stats = pstats.Stats(str(tmp_path / "prof" / files[0]))
    assert any(func[2] == "begin_layer" for func in stats.stats)       # the engine's per-layer host work is in it
    assert "host profile of finemoe-25%-off-gpu- (own time):" in capsys.readouterr().out

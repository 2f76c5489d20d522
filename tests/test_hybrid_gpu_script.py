"""benchmarks/hybrid_gpu.py (--miss-compute gpu|cpu|auto per policy, docs: issue 21 item 1) runs on the CPU with
tiny widths and a small synthetic trace of Qwen1.5-MoE's expert count: every policy x mode row, the agreement
columns and the calibrated costs are in its JSON. The numbers that matter come from the H100 run."""
from __future__ import annotations

import json

import numpy as np

from conftest import load_benchmark
from finemoe.traces.format import Trace


def synthetic_trace(path, requests=4, layers=2, experts=60, top_k=4, prompt=3, new=4) -> str:
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


def test_tiny_cpu_run_reports_every_policy_and_mode(tmp_path):
    bench = load_benchmark("hybrid_gpu")
    out = tmp_path / "hybrid.json"
    result = bench.main(["--trace", synthetic_trace(tmp_path / "t.safetensors"), "--device", "cpu", "--tiny",
                         "--split", "0.5", "--cpu-threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"]
    assert [(r["policy"], r["mode"]) for r in saved["rows"]] == [
        (p, m) for p in ("lru", "moe-infinity", "finemoe") for m in ("gpu", "cpu", "auto", "auto-eager")]
    assert all(v > 0 for k, v in saved["miss_costs"].items() if k != "cpu_token_s")
    assert set(saved["raw_costs"]["cpu_ms_by_tokens"]) == {"1", "4", "16"}
    for r in saved["rows"]:
        if r["mode"] == "cpu":      # every demand miss on the CPU (prefetching policies still copy prefetches)
            assert r["cpu_experts"] == r["misses"] > 0 and (r["policy"] != "lru" or r["bytes_per_token"] == 0)
        if r["mode"] == "gpu":
            assert r["cpu_experts"] == 0
        else:                               # fp32 on the CPU: the CPU half is the device path's math
            assert r["token_agreement"] == 1.0 and r["max_rel_logit_error"] < 1e-3
        if r["mode"] == "auto-eager":       # the eager and the graph path: the same ops (no graphs on the CPU)
            assert r["vs_graph"] == {"token_agreement": 1.0, "max_rel_logit_error": 0.0}

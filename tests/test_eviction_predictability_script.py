"""benchmarks/eviction_predictability.py (is the decode gap to the clairvoyant bound an eviction gap, and
can routing history predict the next use?) runs on any recorded trace; here a small synthetic one. The numbers
that matter come from the ref-moe trace (docs/RESULTS.md); these tests pin down what the script reports."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_benchmark
from finemoe.traces.format import Trace


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("eviction_predictability")


def synthetic_trace(path, requests=4, layers=3, experts=8, top_k=2, prompt=3, new=5) -> str:
    """Requests of `prompt` prefill tokens then `new` decode tokens; routing drawn from a softmax, top-k of it."""
    rng = np.random.default_rng(0)
    tokens = requests * (prompt + new - 1)
    logits = rng.normal(size=(tokens, layers, experts)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    topk = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
    per = prompt + new - 1
    Trace("synthetic", layers, experts, top_k, offsets=np.arange(requests + 1) * per,
          prompt_lens=np.full(requests, prompt), iterations=np.full(requests, new), token_ids=np.arange(tokens) % 50,
          topk=topk.astype(np.uint8), probs=probs.astype(np.float16)).save(str(path))
    return str(path)


def test_reports_every_rule_on_decode_iterations_only(bench, tmp_path):
    trace = synthetic_trace(tmp_path / "t.safetensors")
    out = tmp_path / "rows.json"
    rows = bench.main(["--trace", trace, "--split", "0.5", "--decays", "0.5,0.9", "--expert-bytes", "1000",
                       "--bandwidth", "1", "--out", str(out)])
    labels = [r["policy"] for r in rows]
    assert labels[:4] == ["lru", "lfu", "oracle/prefetch=false", "oracle"]
    rules = ("recency-frequency", "router-ema", "cyclic-next-use")
    assert {f"{n} a={a}" for n in rules for a in (0.5, 0.9)} <= set(labels)
    assert json.loads(out.read_text())["rows"] == rows
    for r in rows:
        assert 0.0 <= r["decode_hit_rate"] <= 1.0 and r["decode_ms_per_token"] > 0
    by = {r["policy"]: r for r in rows}
    # no prefetching: decode bytes are misses times the expert size; Belady's eviction misses least
    assert by["oracle/prefetch=false"]["decode_mb_per_token"] <= min(r["decode_mb_per_token"] for r in rows
                                                                     if r["policy"] != "oracle")

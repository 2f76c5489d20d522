"""The behaviour every refactor keeps: per-policy hits, misses, bytes and simulated times on fixed traces and
budgets (simulator, batch 1) and per-request hits, misses and bytes in the CPU engine (batch 1 and 3).

`tests/golden/behaviour.json` holds these numbers as measured before the code was restructured;
`tests/test_behaviour_kept.py` checks that the current code measures the same. Regenerate (only for an
intended change of behaviour, named in the commit):

    CI=1 PYTHONPATH=src:tests python3 tests/behaviour.py tests/golden/behaviour.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from helpers import topic_trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLAME = SHARED / "data" / "traces" / "flame_moe_290m.npz"
SIM_POLICIES = ("lru", "lfu", "deepspeed", "moe-infinity", "oracle", "resident", "finemoe")
FINEMOE_VARIANTS = {"finemoe": {}, "finemoe:semantic": {"search": "semantic"},
                    "finemoe:lfu-neighbors": {"eviction": "lfu", "neighbors": 1},
                    "finemoe:topk-lru": {"selection": "topk", "eviction": "lru"}}
BUDGETS = ("10%", "25%", "50%")
ENGINE_POLICIES = ("lru", "lfu", "deepspeed", "moe-infinity", "mixtral-offloading", "promoe", "finemoe", "resident")
ENGINE_PROMPTS = ["The expert cache", "Mixture of experts route tokens", "abc", "Hello, MoE", "x y z w",
                  "Offloading keeps idle experts in host memory"]
SIM_FIELDS = ("hits", "misses", "bytes_copied", "prefetch_copies", "wasted_prefetches", "ttft_s", "tpot_s",
              "simulated_s")


def _traces():
    """(name, trace, token embedding for finemoe's token semantics, cost model)."""
    from finemoe.simulator import CostModel
    from finemoe.traces import load_trace
    flame = load_trace(f"{FLAME}#first10")
    torch.manual_seed(0)
    topics_embed = torch.nn.Embedding(50, 8)
    flame_embed = torch.nn.Embedding(int(flame.token_ids.max()) + 1, 16)
    return [("topics", topic_trace(R=12, iters=12), topics_embed, CostModel(1000, 1e6, 1e-3, 1e-4)),
            ("flame-first10", flame, flame_embed, CostModel(17_301_504, 48.4e9, 2e-4, 5e-5))]


def _sim_row(trace, policy, options, budget, cost, embed) -> dict:
    from finemoe.simulator.replay import Replay
    from finemoe.policies import create_policy
    opts = dict(options)
    if policy == "oracle":
        opts["trace"] = trace
    instance = create_policy(policy, **opts)
    row = Replay(trace, instance, budget, cost, embed=embed).run()
    return {k: row[k] for k in SIM_FIELDS}


def simulator_rows() -> dict:
    out = {}
    for name, trace, embed, cost in _traces():
        for policy in SIM_POLICIES:
            variants = FINEMOE_VARIANTS if policy == "finemoe" else {policy: {}}
            for label, options in variants.items():
                for budget in (("100%",) if policy == "resident" else BUDGETS):
                    out[f"sim/{name}/{label}/{budget}"] = _sim_row(trace, policy, options, budget, cost, embed)
    return out


def engine_rows() -> dict:
    from finemoe import EngineConfig
    from finemoe.engine import Engine, SamplingParams
    out = {}
    torch.set_num_threads(1)
    for policy in ENGINE_POLICIES:
        for batch in (1, 3):
            budget = "100%" if policy == "resident" else "25%"
            engine = Engine.from_config(EngineConfig(device="cpu", policy=policy, expert_budget=budget,
                                                     max_batch_size=batch, show_progress=False))
            reqs = engine.generate(ENGINE_PROMPTS, SamplingParams(max_new_tokens=6, ignore_eos=True))
            out[f"engine/{policy}/batch{batch}"] = [
                {"tokens": r.output_ids, "hits": r.metrics.hits, "misses": r.metrics.misses,
                 "bytes_copied": r.metrics.bytes_copied} for r in reqs]
    return out


def measure() -> dict:
    return {**simulator_rows(), **engine_rows()}


if __name__ == "__main__":
    Path(sys.argv[1]).parent.mkdir(parents=True, exist_ok=True)
    rows = measure()
    lines = [f" {json.dumps(key)}: {json.dumps(rows[key])}" for key in sorted(rows)]
    Path(sys.argv[1]).write_text("{\n" + ",\n".join(lines) + "\n}\n")

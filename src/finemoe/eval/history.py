"""Each policy's history, built from the build split only: FineMoE's map store and MoE-Infinity's
activation collection, written to files the evaluation then reads (learn=false).

Engine: the build prompts are served with every expert resident (batches of `batch`), the policy
learning as it goes, and saved when it closes (FineMoEPolicy.close / MoEInfinityPolicy.close).
Simulator: the build part of the recorded trace is replayed at a 100% budget with free copies.
"""
from __future__ import annotations

import json
import os

from finemoe.eval.engine_run import run_requests
from finemoe.eval.variants import HISTORY_OPTION, Variant
from finemoe.simulator import CostModel, Replay
from finemoe.traces.format import Trace

# options that change what a history file holds (everything else only changes how it is used)
_STORE_OPTIONS = {"finemoe": ("semantic", "prefill", "prefetch_distance", "capacity"),
                  "moe-infinity": ("capacity",)}


class HistoryBuilder:
    """Builds each distinct history once and hands out its path. `folder` holds the files."""

    def __init__(self, folder: str, build_fn) -> None:
        self.folder = folder
        self.build_fn = build_fn          # (policy, options) -> None: serve/replay the build split
        self.paths: dict[str, str] = {}

    def options_for(self, variant: Variant, distance: int | None) -> dict:
        """The variant's evaluation options: its history file (built on first use), learn=false."""
        opts = variant.with_distance(distance)
        if not variant.needs_history:
            return opts
        keep = {k: opts[k] for k in _STORE_OPTIONS[variant.policy] if k in opts}
        key = f"{variant.policy}-{json.dumps(keep, sort_keys=True)}"
        if key not in self.paths:
            path = os.path.join(self.folder, f"history-{len(self.paths)}-{variant.policy}.safetensors")
            self.build_fn(variant.policy, {**keep, HISTORY_OPTION[variant.policy]: path, "learn": True,
                                           **({"fresh": True} if variant.policy == "finemoe" else {})})
            self.paths[key] = path
        return {**opts, HISTORY_OPTION[variant.policy]: self.paths[key], "learn": False}


def replay_builder(build_trace: Trace, embed) -> callable:
    """Build function for the simulator: replay the build trace (100% budget, free copies)."""
    cost = CostModel(build_trace.expert_bytes or 1, float("inf"), 0.0)

    def build(policy: str, options: dict) -> None:
        if policy == "finemoe":
            options = {**options, "embed": embed}
        Replay(build_trace, policy, "100%", cost, options).run()
    return build


def engine_builder(engine, requests_fn, batch: int) -> callable:
    """Build function for the engine: serve fresh copies of the build requests with every expert
    resident, then switch the engine to a plain policy so the learned history is saved (close)."""
    def build(policy: str, options: dict) -> None:
        engine.reconfigure(policy, None, options)
        run_requests(engine, requests_fn(), batch)
        engine.reconfigure("lru", None, {})
    return build

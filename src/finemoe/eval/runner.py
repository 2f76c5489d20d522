"""`finemoe bench`'s core: history from the build split, evaluation on the held-out split, one result
row per variant x budget x prefetch distance, in the engine or in the simulator (same row schema).

Simulate mode records one trace of the build prompts and one of the held-out prompts with the engine,
builds histories by replaying the build trace, and replays the held-out trace for every routing-driven
policy (`oracle` sees the held-out trace); speculative policies cannot be simulated and run in the
engine on the same held-out prompts (their rows say mode "engine").
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from finemoe.engine import Engine
from finemoe.engine.metrics import RequestMetrics, aggregate
from finemoe.eval.engine_run import cached_trace, make_requests, run_requests
from finemoe.eval.history import HistoryBuilder, engine_builder, replay_builder
from finemoe.eval.variants import Variant
from finemoe.eval.workload import Prompt
from finemoe.simulator import CostModel, Replay

SUMMARY_KEYS = ("policy", "policy_name", "mode", "expert_budget", "expert_budget_bytes", "cache_slots",
                "budget_percent", "prefetch_distance", "requests", "output_tokens", "hits", "misses", "hit_rate",
                "bytes_copied", "bytes_per_token", "experts_copied", "cpu_experts", "ttft_s", "tpot_s", "stall_s",
                "prefetch_copies", "wasted_prefetches", "store_entries", "store_bytes", "policy_ms_per_iteration")
REQUEST_KEYS = ("policy", "mode", "expert_budget", "prefetch_distance", "request", "source", "prompt_tokens",
                "tokens", "hits", "misses", "hit_rate", "bytes_copied", "cpu_experts", "ttft_s", "tpot_s", "stall_s")


@dataclass
class BenchPlan:
    variants: list[Variant]
    budgets: list[str]
    distances: list[int | None]
    max_new_tokens: int
    build_batch: int = 8
    cost: CostModel | None = None            # None: engine mode
    folder: str | None = None                # history files (a temporary folder when None)
    trace_dir: str | None = None             # keep recorded traces here and reuse them
    miss_compute: str = "gpu"                # simulate mode: where misses run (engine mode: the engine's own)
    jobs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for v in self.variants:
            for d in (self.distances if v.uses_distance else [None]):
                for b in self.budgets:
                    self.jobs.append((v, b, d))


def _policy_extras(policy) -> dict:
    """Store size, memory and the policy's per-iteration time (FineMoE only; blank for others)."""
    store = getattr(policy, "store", None)
    state = policy.state_dict() if store is not None else {}
    if store is None:
        return {}
    nbytes = sum(t.numel() * t.element_size() for t in (store.maps, store.sems, store.sem_norm, store.prefix_sq))
    return {"store_entries": store.size, "store_bytes": nbytes,
            "policy_ms_per_iteration": 1e3 * state.get("critical_path_s_per_iteration", float("nan"))}


def _rows(v: Variant, budget: str, d, mode: str, metrics: list[RequestMetrics], prompts: list[Prompt],
          extra: dict, expert_bytes: int, byte_scale: float = 1.0) -> tuple[dict, list[dict]]:
    """Summary row and per-request rows. `byte_scale` re-costs copied bytes (engine rows in simulate mode
    are re-costed at the simulator's expert size, so bytes compare across modes)."""
    s = aggregate(metrics)
    per = []
    for i, (m, p) in enumerate(zip(metrics, prompts)):
        row = {"policy": v.label, "mode": mode, "expert_budget": budget, "prefetch_distance": d, "request": i,
               "source": p.source, "prompt_tokens": len(p.ids), **m.as_dict(), "tokens": m.tokens}
        row["bytes_copied"] = int(round(m.bytes_copied * byte_scale))
        per.append(row)
    summary = {**s, **extra, "policy": v.label, "policy_name": v.policy, "mode": mode, "expert_budget": budget,
               "prefetch_distance": d, "bytes_copied": int(round(s["bytes_copied"] * byte_scale)),
               "bytes_per_token": s["bytes_per_token"] * byte_scale,
               "experts_copied": int(round(s["bytes_copied"] / expert_bytes)),
               "budget_percent": 100.0 * extra["cache_slots"] / extra["total_experts"]}
    return {k: summary.get(k) for k in SUMMARY_KEYS}, per


class Bench:
    """Runs a BenchPlan on one loaded engine. `progress` is called once per finished job with its label."""

    def __init__(self, engine: Engine, build: list[Prompt], held_out: list[Prompt], plan: BenchPlan,
                 progress=lambda label: None) -> None:
        self.engine, self.build, self.held_out, self.plan, self.progress = engine, build, held_out, plan, progress
        self._eval_trace = None

    def run(self) -> tuple[list[dict], list[dict]]:
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.plan.folder or tmp
            if self.plan.cost is None:
                return self._run_engine(folder, self.plan.jobs)
            return self._run_simulated(folder)

    # ---- engine ---------------------------------------------------------------------------------
    def _held_out_trace(self):
        if self._eval_trace is None:
            self._eval_trace = cached_trace(self.plan.trace_dir, self.engine, self.held_out, self.plan.max_new_tokens,
                                            self.plan.build_batch)
        return self._eval_trace

    def _run_engine(self, folder: str, jobs: list, byte_scale: float = 1.0) -> tuple[list[dict], list[dict]]:
        builder = HistoryBuilder(folder, engine_builder(
            self.engine, lambda: make_requests(self.build, self.plan.max_new_tokens), self.plan.build_batch))
        summary, per = [], []
        for v, budget, d in jobs:
            opts = builder.options_for(v, d)
            if v.policy == "oracle":
                opts.setdefault("trace", self._held_out_trace())
            self.engine.reconfigure(v.policy, budget, opts, **self._hybrid())
            reqs = run_requests(self.engine, make_requests(self.held_out, self.plan.max_new_tokens), 1)
            s = self.engine.summary(reqs)
            extra = {**_policy_extras(self.engine.policy), "expert_budget_bytes": s["expert_budget_bytes"],
                     "cache_slots": s["cache_slots"], "prefetch_copies": s["prefetch_copies"],
                     "wasted_prefetches": s["wasted_prefetches"]}
            if byte_scale != 1.0:
                extra["expert_budget_bytes"] = int(s["cache_slots"] * self.plan.cost.expert_bytes)
            extra["total_experts"] = self.engine.geometry.total_experts
            row, rows = _rows(v, budget, d, "engine", [r.metrics for r in reqs], self.held_out, extra,
                              self.engine.geometry.expert_bytes, byte_scale)
            summary.append(row)
            per.extend(rows)
            self.progress(f"{v.label} {budget} d={d}")
        self.engine.reconfigure("lru", None, {})
        return summary, per

    def _hybrid(self) -> dict:
        """Simulate mode: the engine's jobs (speculative policies) split misses as the simulated ones do, by the
        simulator's costs; engine mode: the engine's own configuration."""
        cost = self.plan.cost
        return {} if cost is None else {"miss_compute": self.plan.miss_compute, "miss_costs": cost.miss_costs}

    # ---- simulator ------------------------------------------------------------------------------
    def _run_simulated(self, folder: str) -> tuple[list[dict], list[dict]]:
        cost, plan = self.plan.cost, self.plan
        embed = self.engine.model.get_input_embeddings()
        build_trace = cached_trace(plan.trace_dir, self.engine, self.build, plan.max_new_tokens, plan.build_batch)
        held = self._held_out_trace()
        self.progress("recorded traces")
        builder = HistoryBuilder(folder, replay_builder(build_trace, embed))
        done: dict[int, tuple[dict, list[dict]]] = {}
        for i, (v, budget, d) in enumerate(plan.jobs):
            if v.speculative:
                continue
            opts = builder.options_for(v, d)
            if v.policy == "finemoe":
                opts["embed"] = embed
            replay = Replay(held, v.policy, budget, cost, opts, miss_compute=plan.miss_compute)
            res = replay.run()
            extra = {**_policy_extras(replay.policy), **{k: res[k] for k in (
                "expert_budget_bytes", "cache_slots", "prefetch_copies", "wasted_prefetches")},
                     "total_experts": replay.g.total_experts}
            done[i] = _rows(v, budget, d, "simulate", replay.metrics, self.held_out, extra, cost.expert_bytes)
            self.progress(f"{v.label} {budget} d={d}")
        engine_idx = [i for i in range(len(plan.jobs)) if i not in done]
        if engine_idx:
            scale = cost.expert_bytes / self.engine.geometry.expert_bytes
            s2, p2 = self._run_engine(folder, [plan.jobs[i] for i in engine_idx], scale)
            for i, row in zip(engine_idx, s2):
                done[i] = (row, [r for r in p2 if r["policy"] == row["policy"]
                                 and r["expert_budget"] == row["expert_budget"]
                                 and r["prefetch_distance"] == row["prefetch_distance"]])
        summary = [done[i][0] for i in range(len(plan.jobs))]
        per = [r for i in range(len(plan.jobs)) for r in done[i][1]]
        return summary, per

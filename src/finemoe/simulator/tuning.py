"""`finemoe tune`'s core: replay one routing trace over budgets x policies x miss-compute modes x prefetch issue
rules and recommend the
setting with the lowest predicted TPOT (per budget, and overall).

Every row is one simulator Replay (simulator/replay.py) under one CostModel, so the rows compare with each other;
how far they are from the engine is the cost model's calibration (docs/POLICIES.md, the simulator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from finemoe.errors import ConfigError
from finemoe.experts.prefetch_issue import INFLIGHT, PrefetchIssue
from finemoe.policies import available, get_policy_class
from finemoe.simulator.replay import Replay, Routed, check_simulatable
from finemoe.simulator.transport import CostModel
from finemoe.traces.format import Trace

# registered policies that are no serving setting: `record` only records routing, `resident` holds every expert
# (no budget), `oracle` reads the future (an upper bound: name it with --policy to see it)
NOT_SETTINGS = ("record", "resident", "oracle")
ROW_KEYS = ("expert_budget", "policy", "miss_compute", "prefetch_issue", "expert_budget_bytes", "cache_slots",
            "hit_rate", "misses", "cpu_experts", "bytes_per_token", "ttft_s", "tpot_s", "stall_s", "cpu_wait_s")


def default_policies(trace: Trace) -> list[str]:
    """The registered routing-only policies this trace can drive (full router probabilities where needed)."""
    out = []
    for name in available():
        cls = get_policy_class(name)
        if name in NOT_SETTINGS or cls.needs_hidden_states or (cls.needs_router_probs and not trace.has_probs):
            continue
        out.append(name)
    return out


@dataclass
class Tuning:
    rows: list[dict]                 # one per budget x policy x mode x issue rule, ROW_KEYS, in that nesting order
    per_budget: dict[str, dict]      # budget -> its row with the lowest TPOT
    best: dict                       # the row with the lowest TPOT overall
    skipped: dict[str, str] = field(default_factory=dict)   # default policy -> why it could not run

    def as_json(self) -> dict:
        return {"results": self.rows, "recommended": {"per_budget": self.per_budget, "best": self.best},
                "skipped": self.skipped}


def _tpot_key(row: dict) -> float:
    """Lowest TPOT first; a row without one (no request made two tokens) last."""
    t = row["tpot_s"]
    return math.inf if t != t else t


def recommend(rows: list[dict]) -> tuple[dict[str, dict], dict]:
    """(budget -> the lowest-TPOT row of that budget, the lowest-TPOT row); ties keep the first row."""
    per_budget: dict[str, dict] = {}
    for row in rows:
        held = per_budget.get(row["expert_budget"])
        if held is None or _tpot_key(row) < _tpot_key(held):
            per_budget[row["expert_budget"]] = row
    return per_budget, min(rows, key=_tpot_key)


def tune(trace: Trace, budgets: list[str], policies: list[str], modes: list[str], cost: CostModel,
         policy_options: dict[str, dict] | None = None, prefetch_inflight: int = 4, embed=None,
         optional: bool = False, issues: list[PrefetchIssue] | None = None) -> Tuning:
    """Replay `trace` for every budget x policy x mode under `cost` (its CPU costs charge the CPU half).
    `embed`: the recorded model's input embedding (finemoe's token semantics). `optional`: a policy that cannot
    run on these inputs (a ConfigError, e.g. finemoe without `embed`) is left out and named in `skipped`
    instead of failing the run (for the default policy list)."""
    for p in policies:
        check_simulatable(trace, p)
    routed = Routed.of(trace)                      # the trace cut for replay once, shared by every row
    rows, skipped = [], {}
    for budget in budgets:
        for policy in policies:
            opts = (policy_options or {}).get(policy, {})
            for mode in modes:
                for issue in issues or [INFLIGHT]:
                    if policy in skipped:
                        break
                    try:
                        res = Replay(trace, policy, budget, cost, opts, prefetch_inflight, routed, embed, mode,
                                     issue=issue).run()
                    except ConfigError as e:
                        if not optional:
                            raise
                        skipped[policy] = str(e)
                        break
                    res.update(expert_budget=budget, miss_compute=mode, prefetch_issue=issue.mode)
                    rows.append({k: res[k] for k in ROW_KEYS})
    if not rows:
        raise ConfigError("no policy could run: " + "; ".join(f"{p}: {why}" for p, why in skipped.items()))
    per_budget, best = recommend(rows)
    return Tuning(rows, per_budget, best, skipped)

"""`--non-expert-placement auto`: choose between `primary` and `split` by measuring them on the actual devices.

At start-up, for each candidate placement the engine is configured with the warm-up's stand-in policy (lru, at
the configured budget: the policy never sees these requests) and decodes one short request to pay first-use costs
(allocations, the graph capture of `primary`), then the same request again, timed: its TPOT (mean time per decode
step, device work included) is the candidate's figure. Both candidates compute the same tokens with the same cache
capacity, so they copy the same experts; only where the layers run differs. The lower TPOT wins (ties: `primary`,
which keeps CUDA graphs); one line on stderr says what was measured and chosen.

`PlacementChoice` is the engine's named record of the placement its decoder layers run under and how it was
decided (`chosen_by`): `option` (--non-expert-placement primary or split; one device: primary), `timing` (auto:
`tpot_s` holds both candidates' measured TPOT), `reconfigure` (Engine.reconfigure named a mode: benchmarks, tests)
or `placement` (Engine.reconfigure was given a Placement, which records the mode it was built for). The engine
summary reports it as non_expert_placement, non_expert_placement_chosen_by and placement_tpot_s.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from finemoe.engine.sampling import SamplingParams
from finemoe.engine.warmup import STAND_IN_POLICY, warm_up_ids
from finemoe.experts.placement import Placement

DECODE_STEPS = 16   # decode steps timed per candidate


CHOSEN_BY = ("option", "timing", "reconfigure", "placement")


@dataclass(frozen=True)
class PlacementChoice:
    mode: str                              # primary or split
    chosen_by: str                         # one of CHOSEN_BY (module docstring)
    tpot_s: dict[str, float] | None = None   # timing: measured TPOT of each candidate; else None

    def report(self) -> dict:
        """The engine summary's fields."""
        return {"non_expert_placement": self.mode, "non_expert_placement_chosen_by": self.chosen_by,
                "placement_tpot_s": self.tpot_s}

    def describe(self) -> str:
        times = ", ".join(f"{m} {1e3 * t:.2f} ms" for m, t in self.tpot_s.items())
        return f"non-expert placement auto: {self.mode} (TPOT over {DECODE_STEPS} decode steps: {times})"


def measure(engine, budget, **config) -> float:
    """TPOT (s) of the stand-in policy decoding DECODE_STEPS tokens with the engine reconfigured by `config`
    (`Engine.reconfigure`'s keywords: a placement, a miss-compute mode), after one untimed run. HOST SYNC."""
    engine.reconfigure(STAND_IN_POLICY, budget, **config)
    ids = warm_up_ids(engine)[:max(engine.max_model_len - 2, 1)]
    params = SamplingParams(max_new_tokens=min(DECODE_STEPS + 1, engine.max_model_len - len(ids)), ignore_eos=True)
    engine.generate([ids], params)
    return float(engine.generate([ids], params)[0].metrics.tpot_s)


def choose(engine, placements: dict[str, Placement], budget) -> PlacementChoice:
    """Measure every candidate placement (in order; the first wins ties) and print the choice once on stderr."""
    tpot = {mode: measure(engine, budget, placement=p) for mode, p in placements.items()}
    modes = list(tpot)
    best = modes[int(np.argmin([tpot[m] for m in modes]))]
    choice = PlacementChoice(best, "timing", tpot)
    print(f"finemoe: {choice.describe()}", file=sys.stderr)
    return choice

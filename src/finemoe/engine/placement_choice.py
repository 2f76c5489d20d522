"""`--non-expert-placement auto`: choose between `primary` and `split` by measuring them on the actual devices.

At start-up each candidate placement is timed (engine/timed_choice.py: the warm-up's stand-in decoding a short
request). Both candidates compute the same tokens with the same cache capacity, so they copy the same experts; only
where the layers run differs. The lower TPOT wins (ties: `primary`, which keeps CUDA graphs); one line on stderr says
what was measured and chosen.

`PlacementChoice` is the engine's named record of the placement its decoder layers run under and how it was
decided (`chosen_by`): `option` (--non-expert-placement primary or split; one device: primary), `timing` (auto:
`tpot_s` holds both candidates' measured TPOT), `reconfigure` (Engine.reconfigure named a mode: benchmarks, tests)
or `placement` (Engine.reconfigure was given a Placement, which records the mode it was built for). The engine
summary reports it as non_expert_placement, non_expert_placement_chosen_by and placement_tpot_s.
"""
from __future__ import annotations

from dataclasses import dataclass

from finemoe.engine.timed_choice import TimedChoice, decided, measure
from finemoe.experts.placement import Placement

CHOSEN_BY = ("option", "timing", "reconfigure", "placement")


@dataclass(frozen=True)
class PlacementChoice(TimedChoice):
    what = "non-expert placement"

    def report(self) -> dict:
        return {"non_expert_placement": self.mode, "non_expert_placement_chosen_by": self.chosen_by,
                "placement_tpot_s": self.tpot_s}


def choose(engine, placements: dict[str, Placement], budget) -> PlacementChoice:
    """Measure every candidate placement (in order; the first wins ties) and print the choice once on stderr."""
    return decided(PlacementChoice, {mode: measure(engine, budget, placement=p) for mode, p in placements.items()})

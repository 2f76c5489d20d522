"""`--miss-compute auto`, checked end to end at start: the CPU/GPU split is kept only where it decodes faster than
copying every miss.

The auto split (experts/miss_split.py) minimises each layer's finish time under costs calibrated at start
(experts/calibration.py: one expert copied, one expert computed on the CPU). What the CPU half costs outside its
own time is not in those costs: the copies slowed while the CPU reads host memory, the hybrid graph segments' extra
work (docs/RESULTS.md section 7 measured about 0.3 ms per CPU-computed expert on the H100 host). So on a GPU the
engine also times the warm-up's stand-in policy (lru at the configured budget, engine/timed_choice.py: the same
request, an untimed run first) decoding under `auto` and under `gpu`, and serves in `auto` only when it was faster;
otherwise in `gpu` mode, which is exact. One line on stderr says what was measured and chosen.

`MissChoice` is the engine's record of the mode its misses run under and how it was decided (`chosen_by`):
`option` (--miss-compute gpu or cpu, or auto where nothing was timed: on the CPU), `timing` (auto on a GPU;
`tpot_s` holds both measured TPOTs) or `reconfigure` (Engine.reconfigure named a mode: benchmarks, tests, which
measure a mode as given). The engine summary reports it as miss_compute, miss_compute_chosen_by and
miss_compute_tpot_s.
"""
from __future__ import annotations

from dataclasses import dataclass

from finemoe.engine.timed_choice import TimedChoice, decided, measure

CHOSEN_BY = ("option", "timing", "reconfigure")
TIMED_ON = ("cuda",)             # device types whose engines time auto at start (tests add "cpu")
CANDIDATES = ("gpu", "auto")     # in order: the first wins ties (exact)


@dataclass(frozen=True)
class MissChoice(TimedChoice):
    what = "miss compute"

    def report(self) -> dict:
        return {"miss_compute": self.mode, "miss_compute_chosen_by": self.chosen_by,
                "miss_compute_tpot_s": self.tpot_s}

    def describe(self) -> str:
        return super().describe() + ("" if self.mode == "auto" else "; misses are copied (exact)")


def choose(engine, budget) -> MissChoice:
    """Time the stand-in policy under each of CANDIDATES at `budget` (HOST SYNC) and print the choice once on
    stderr; the engine is left reconfigured for the last candidate timed."""
    return decided(MissChoice, {mode: measure(engine, budget, miss_compute=mode) for mode in CANDIDATES})

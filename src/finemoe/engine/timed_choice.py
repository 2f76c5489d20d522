"""Start-up decisions taken by timing (`--non-expert-placement auto`, `--miss-compute auto` on a GPU): each
candidate configuration decodes the warm-up's short request under the stand-in policy (lru at the configured
budget: the configured policy never sees these requests), once untimed to pay first-use costs (allocations, graph
capture), then again timed; its TPOT (mean time per decode step, device work included) is the candidate's figure.
The lowest wins, ties to the first candidate; one line on stderr says what was measured and chosen.

`TimedChoice` is the engine's record of such a decision: the mode in use and how it was decided (`chosen_by`; each
decision's module lists its values), with every candidate's TPOT when it was timed. Each decision subclasses it
with its name and its summary keys.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

from finemoe.engine.sampling import SamplingParams
from finemoe.engine.warmup import STAND_IN_POLICY, warm_up_ids

DECODE_STEPS = 16   # decode steps timed per candidate


@dataclass(frozen=True)
class TimedChoice:
    mode: str                                # the candidate in use
    chosen_by: str                           # how it was decided (the subclass's module lists the values)
    tpot_s: dict[str, float] | None = None   # timing: measured TPOT of each candidate; else None
    what: ClassVar[str] = ""                 # the decision's name on stderr, e.g. "miss compute"

    def report(self) -> dict:
        """The engine summary's fields."""
        raise NotImplementedError

    def describe(self) -> str:
        times = ", ".join(f"{m} {1e3 * t:.2f} ms" for m, t in self.tpot_s.items())
        return f"{self.what} auto: {self.mode} (TPOT over {DECODE_STEPS} decode steps: {times})"


def measure(engine, budget, **config) -> float:
    """TPOT (s) of the stand-in policy decoding DECODE_STEPS tokens with the engine reconfigured by `config`
    (`Engine.reconfigure`'s keywords: a placement, a miss-compute mode), after one untimed run. HOST SYNC."""
    engine.reconfigure(STAND_IN_POLICY, budget, **config)
    ids = warm_up_ids(engine)[:max(engine.max_model_len - 2, 1)]
    params = SamplingParams(max_new_tokens=min(DECODE_STEPS + 1, engine.max_model_len - len(ids)), ignore_eos=True)
    engine.generate([ids], params)
    return float(engine.generate([ids], params)[0].metrics.tpot_s)


def decided(cls: type[TimedChoice], tpot: dict[str, float]) -> TimedChoice:
    """The `cls` record of the fastest candidate in `tpot` (in order: the first of equals wins), printed once on
    stderr."""
    choice = cls(min(tpot, key=tpot.__getitem__), "timing", dict(tpot))
    print(f"finemoe: {choice.describe()}", file=sys.stderr)
    return choice

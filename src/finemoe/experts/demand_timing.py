"""When the next demand load comes: the idle prefetch issue rule's budget (experts/prefetch_issue.py (b)), one rule
that the engine's CudaTransport calls with host-clock times and the simulator's timed kernels with simulated ones.

A layer's demand load at time t updates the period, the running mean of the time between successive demand loads
(weight PERIOD_WEIGHT; the first gap sets it; a gap of PERIOD_GAP_LIMIT x the mean or more, an iteration boundary,
is left out), and the next demand is expected one period after the last load. The copy engine's idle time at `now`:

    idle = last_load + period - max(now, end of the copy engine's queued work)      (>= 0; 0 until a period is known)

and the budget is idle x the copy bandwidth. The period includes whatever a layer waits for (its demand copies, a CPU
half), so in the copy-bound regime the prediction is about one layer's compute. Pure functions of floats (numba:
the simulator's compiled loop calls them; from Python a call costs well under a microsecond).
"""
from __future__ import annotations

from finemoe.jit import njit

PERIOD_WEIGHT = 0.1        # the running mean's weight of the latest gap between demand loads
PERIOD_GAP_LIMIT = 3.0     # a gap this many periods long or longer (an iteration boundary) is left out
NO_LOAD = -1.0             # last_load before the first demand load


@njit
def demand_period(period, last_load, now):
    """The period after a demand load at `now` (s): the first gap sets it, a gap under PERIOD_GAP_LIMIT x the period
    moves it by PERIOD_WEIGHT, a longer one leaves it; with no load before (last_load NO_LOAD) it stays. The caller
    then sets last_load = now."""
    if last_load < 0.0:
        return period
    gap = now - last_load
    if period == 0.0:
        return gap
    if gap < PERIOD_GAP_LIMIT * period:
        return period + PERIOD_WEIGHT * (gap - period)
    return period


@njit
def idle_seconds(last_load, period, now, busy_until):
    """The copy engine's predicted idle time (s) from `now` to the next demand load, expected at last_load + period,
    after its queued work ends at busy_until: >= 0, and 0 while no period is known."""
    if period == 0.0:
        return 0.0
    return max(last_load + period - max(now, busy_until), 0.0)

"""How the cache issues prefetch copies (`--prefetch-issue`, `--copy-chunk-bytes`).

  inflight  (default) at each layer boundary, whole-expert prefetch copies while fewer than `prefetch_inflight`
            are in flight. A demand copy queues behind up to that many whole copies (one CUDA copy stream is FIFO).
  idle      prefetches never delay a demand copy:
            (a) a prefetch copy goes in chunks of `chunk_bytes` (an expert's bytes, its tensors in order, piece by
                piece); its slot is usable once every chunk has landed; a demand for an expert whose prefetch is
                partly copied issues the remaining chunks at once, as demand, ahead of every later copy;
            (b) at each layer boundary the cache issues only the chunks that fit the copy engine's predicted idle
                time before the next layer's demand (Transport.idle_bytes; the rule below); the rest stay queued on
                the host and go at a later boundary. A demand copy therefore waits behind at most the chunk in
                flight when the prediction errs, never behind queued whole prefetches;
            (c) no pollution: for a policy whose rank gate is its value of holding a key (Policy.gate_values_keys:
                finemoe, whose gate is each expert's latest guiding probability p, and oracle, minus the next use),
                a prefetch of key k evicts only victims whose gate is below gate[k]: a prefetch with probability of
                use p evicts only experts with p' < p. Other policies' prefetches keep their rank's limit only;
            (d) an expert computed on the host CPU (--miss-compute cpu|auto) is copied afterwards for reuse: queued at
                the next iteration's start below every policy prefetch (slot_kernels.CPU_COPY_PRIORITY), so it takes
                only the idle time the policy's prefetches leave, under (c)'s victim rules. (Not under inflight,
                where such copies would delay demand copies.)
  off       no prefetch copies: the policy still predicts (its host work and eviction rank are unchanged) but its
            prefetches, and the prefill lookahead's, are dropped. Every expert arrives by a demand copy: the baseline
            that shows what a policy's prefetching is worth.
When the next demand comes (one rule, `demand_period` and `idle_seconds`, which the engine's CudaTransport calls
with host-clock times and the simulator's timed kernels with simulated ones): a layer's demand load at time t updates
the period, the running mean of the time between successive demand loads (weight PERIOD_WEIGHT; the first gap sets
it; a gap of PERIOD_GAP_LIMIT x the mean or more, an iteration boundary, is left out), and the next demand is
expected one period after the last load. The idle time at `now` is then

    idle = last_load + period - max(now, copy engine's queued work's end)      (>= 0; 0 until a period is known)

and the budget is idle x the copy bandwidth. The period includes whatever a layer waits for (its demand copies, a
CPU half), so in the copy-bound regime the prediction is about one layer's compute.
The chunk size trades copy throughput (small copies run below the link's rate) against how long a demand may wait
behind the chunk in flight: benchmarks/copy_chunks.py measures both.
"""
from __future__ import annotations

from dataclasses import dataclass

from finemoe.errors import ConfigError
from finemoe.jit import njit

ISSUE_MODES = ("inflight", "idle", "off")
CHUNK_ALIGN = 256          # chunk boundaries stay on element (and DMA-friendly) boundaries
DEFAULT_CHUNK_BYTES = 4 << 20
PERIOD_WEIGHT = 0.1        # the running mean's weight of the latest gap between demand loads
PERIOD_GAP_LIMIT = 3.0     # a gap this many periods long or longer (an iteration boundary) is left out
NO_LOAD = -1.0             # last_load before the first demand load


@njit
def demand_period(period, last_load, now):
    """The period after a demand load at `now` (s): the first gap sets it, a gap under PERIOD_GAP_LIMIT x the period
    moves it by PERIOD_WEIGHT, a longer one leaves it. last_load NO_LOAD (no load yet) or period 0 and no gap: as is.
    The caller then sets last_load = now."""
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


@dataclass(frozen=True)
class PrefetchIssue:
    mode: str = "inflight"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.mode not in ISSUE_MODES:
            raise ConfigError(f"--prefetch-issue {self.mode!r} is not one of {', '.join(ISSUE_MODES)}")
        if (isinstance(self.chunk_bytes, bool) or not isinstance(self.chunk_bytes, int) or self.chunk_bytes < 1
                or self.chunk_bytes % CHUNK_ALIGN):
            raise ConfigError(f"--copy-chunk-bytes {self.chunk_bytes!r} must be a positive multiple of {CHUNK_ALIGN}")

    @property
    def idle(self) -> bool:
        return self.mode == "idle"

    @property
    def off(self) -> bool:
        return self.mode == "off"


INFLIGHT = PrefetchIssue()    # the default rule

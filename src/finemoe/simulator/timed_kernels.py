"""The timed transport's copies and waits, compiled: the simulator's only implementation of them, called by
TimedTransport (simulator/transport.py) for the cache's Python path and by the compiled decode loop
(simulator/decode_loop.py).

Copies run on one copy engine, one after another (like one CUDA copy stream): a copy into slot s starts when
the engine is free, `now` has come and the compute that last read s has finished (read_until[s]), and takes
copy_s. A copy is done once its end time <= now. A demand stall moves `now` to the last awaited copy's end.
A hybrid layer (`--miss-compute cpu|auto`) follows the engine's captured decode path (`cpu_half`, the one rule of it,
which both the cache's Python path and the compiled decode loop call): the host learns the routing (`routing_learned`:
`routed`), the copy engine runs the device half's demand copies from then, the host thread runs the CPU half from then
too, and only after it does the host replay the segment that computes the layer, so the compute starts when both
are done: the wait beyond the copies is a stall too.
A copy may go in byte ranges (`copy_run`: chunks of the idle issue rule, experts/prefetch_issue.py), each taking its
share of copy_s; a slot's copy is done once its last range has landed. `ahead_max` records the most prefetch copy
time ever queued ahead of a demand copy when it was issued (what "a demand never waits behind a prefetch" bounds).
The idle issue rule's budget (`idle_bytes`) predicts the next demand as the engine's CudaTransport does, on the
simulated clock: `load` updates the period between demand loads and the last load's time (TIMES `period`,
`last_load`) with the engine's own functions (experts/demand_timing.py `demand_period`, `idle_seconds`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from finemoe.experts.demand_timing import NO_LOAD, demand_period, idle_seconds
from finemoe.jit import njit

TIMES = np.dtype([("now", np.float64),           # the current layer's compute start (s)
                  ("engine_free", np.float64),   # end of the last copy issued (s)
                  ("stall", np.float64),         # demand stall since the last drain (s)
                  ("bytes", np.float64),         # bytes copied (exact below 2**53)
                  ("cpu_wait", np.float64),      # of the stall, time waited for CPU halves beyond the copies (s)
                  ("prefetch_end", np.float64),  # end of the last prefetch copy issued (s)
                  ("ahead_max", np.float64),     # most prefetch copy time queued ahead of a demand copy (s)
                  ("routed", np.float64),        # when the current layer's routing reached the host (s)
                  ("last_load", np.float64),     # the last demand load's time (s; NO_LOAD before the first)
                  ("period", np.float64)])       # running mean time between demand loads (s; prefetch_issue rule)


class CopyClock(NamedTuple):
    """The timed transport's state (N slots)."""

    times: np.ndarray        # TIMES [1]
    done_at: np.ndarray      # float64 [N] end of each slot's last copy
    read_until: np.ndarray   # float64 [N] end of the compute that last read each slot
    copy_s: float            # seconds per expert copy
    expert_bytes: float
    layer_s: float           # compute time of one layer (how long a released slot stays read)

    @staticmethod
    def start(num_slots: int, copy_s: float, expert_bytes: float, layer_s: float) -> CopyClock:
        times = np.zeros(1, TIMES)
        times[0]["last_load"] = NO_LOAD
        return CopyClock(times, np.zeros(num_slots), np.zeros(num_slots), float(copy_s), float(expert_bytes),
                         float(layer_s))


@njit
def copy(cc, slots, m):
    """Prefetch copies of whole experts into slots[:m], in order, behind the copy engine's queue."""
    full = np.int64(cc.expert_bytes)
    for i in range(m):
        copy_run(cc, slots[i], 0, full, False)


@njit
def _note_ahead(t):
    """A demand copy is issued now: record the prefetch copy time queued ahead of it."""
    t.ahead_max = max(t.ahead_max, t.prefetch_end - t.now)


@njit
def copy_run(cc, s, lo, hi, demand):
    """Copy bytes [lo, hi) of an expert into slot s behind the copy engine's queue (a prefetch's chunks, or, with
    `demand`, the rest of a partly issued prefetch a demand needs). The slot's copy is done when the range ending at
    expert_bytes lands; until then it is not done."""
    t = cc.times[0]
    if demand:
        _note_ahead(t)
    end = max(t.now, t.engine_free, cc.read_until[s]) + cc.copy_s * ((hi - lo) / cc.expert_bytes)
    cc.done_at[s] = end if hi >= cc.expert_bytes else np.inf
    t.engine_free = end
    t.bytes += hi - lo
    if not demand:
        t.prefetch_end = end


@njit
def idle_bytes(cc):
    """Bytes the copy engine can move between its queued work's end and the next layer's demand, predicted by the
    engine's rule on the simulated clock (experts/demand_timing.py `idle_seconds`: one period after the last demand
    load) x bandwidth, >= 0 (inf when copies are free)."""
    if cc.copy_s == 0.0:
        return np.inf
    t = cc.times[0]
    return idle_seconds(t.last_load, t.period, t.now, t.engine_free) * (cc.expert_bytes / cc.copy_s)


@njit
def load(cc, slots, new, hit):
    """The demand of one layer: copy slots[i] where new[i] (in order), hit[i] = present and copied by now, and
    the compute waits for every other slot's copy (the stall). Returns the hits. The load at now updates the period
    between demand loads (demand_timing.demand_period, as the engine's transport does on the host clock)."""
    t = cc.times[0]
    now = t.now
    t.period = demand_period(t.period, t.last_load, now)
    t.last_load = now
    ready = now
    hits = 0
    full = np.int64(cc.expert_bytes)
    for i in range(slots.size):
        s = slots[i]
        hit[i] = False
        if new[i]:                                   # copied now, behind the copy engine's queue
            copy_run(cc, s, 0, full, True)
            ready = max(ready, cc.done_at[s])
        elif cc.done_at[s] <= now:
            hit[i] = True
            hits += 1
        else:                                        # a prefetch still in flight
            ready = max(ready, cc.done_at[s])
    if ready > now:
        t.stall += ready - now
        t.now = ready
    return hits


@njit
def routing_learned(cc, host_s):
    """The host learns the current layer's routing after its round trip host_s (the engine's named routing sync, its
    cache work and the segment's replay: CostModel.host_layer_s): now and `routed` move there. The layer's demand
    copies are issued and its CPU half starts from `routed`."""
    t = cc.times[0]
    t.now += host_s
    t.routed = t.now


@njit
def cpu_half(cc, seconds):
    """A hybrid layer's timeline, as the engine's captured decode path runs it (engine/graphs.py `replay`,
    runtime.begin_replayed_layer, engine/cpu_misses.py `run_static`); `load` has moved now to the end of the device
    half's demand copies. In the engine, after the routing sync the host thread issues those copies, then runs the
    CPU half to completion (`start`: the CPU rows' inputs to the host; `finish`: HOST SYNC on them, the CPU
    compute, the result's copy queued), and only then replays the next graph segment, which computes the device
    half's experts (after waiting for its copies), adds the CPU result and runs the model up to the next layer's
    routing. So:

        CPU half   host thread, from `routed` for `seconds` (MissCosts.cpu_time: cpu_layer_s + per expert)
        copies     copy engine, from `routed` (behind its queue), as `load` charged them
        compute    device, from max(copies' end, routed + seconds), for the layer time (the clock's step)

    The device half's compute never overlaps the CPU half, and the host's policy work (`finish_layer`, after the
    replay) follows it. The wait beyond the copies is stall, and cpu_wait."""
    t = cc.times[0]
    end = t.routed + seconds
    if end > t.now:
        t.stall += end - t.now
        t.cpu_wait += end - t.now
        t.now = end


@njit
def queued_seconds(cc):
    """The copy engine's work queued after now (s)."""
    t = cc.times[0]
    return max(t.engine_free - t.now, 0.0)


@njit
def used(cc, slots, n):
    """The layer computing from now reads slots[:n] until now + layer_s."""
    until = cc.times[0].now + cc.layer_s
    for i in range(n):
        cc.read_until[slots[i]] = until


@njit
def finished(cc, slots, out):
    """out[i] = the copy into slots[i] has finished by now."""
    now = cc.times[0].now
    for i in range(slots.size):
        out[i] = cc.done_at[slots[i]] <= now


@functools.cache
def warm_up() -> None:
    """Compile (or load from numba's disk cache) the kernels once per process (see slot_kernels.warm_up)."""
    cc = CopyClock.start(2, 0.5, 10.0, 1.0)
    slots, flags = np.zeros(2, np.int64), np.zeros(2, bool)
    copy(cc, slots, 1)
    load(cc, slots, flags, flags.copy())
    routing_learned(cc, 0.0)
    cpu_half(cc, 1.0)
    used(cc, slots, 1)
    finished(cc, slots, flags)
    copy_run(cc, 0, 0, 5, True)
    idle_bytes(cc)

"""What happens at one MoE layer, host side: the one definition that the engine's runtime (engine/runtime.py:
real copies, real time) and the simulator's replay (simulator/replay.py: timed copies, a simulated clock) both
drive. Only the cache's transport and the clock differ between them.

Per layer:
  begin    clock: the routing is on the host; policy.on_access; the demand's first wave: cache.acquire, when
           the layer's experts fit the cache (misses copy now, the compute waits only for those)
  (the driver issues the layer's compute; a layer needing more experts than slots, or that the engine cannot
   compute in one slot window, runs `waves`: each wave of `capacity` experts acquired, computed, released)
  finish   cache.release; policy.on_layer_routed -> cache.enqueue (prefetches queue behind the demand copies);
           cache.pump(layer); clock: the layer computed
The simulator's compiled decode loop (simulator/decode_loop.py) is this sequence compiled, for one-token decode
iterations of policies that offer their callbacks compiled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol
from collections.abc import Callable

import numpy as np

from finemoe.experts.cache import DemandResult, ExpertCache
from finemoe.experts.miss_split import AUTO, GPU, MissCosts, split
from finemoe.policies.base import LayerRouting, Policy


class LayerClock(Protocol):
    def routing_learned(self) -> None:
        """The host has learned the layer's routing (the simulator charges the host round trip)."""

    def layer_computed(self) -> None:
        """The layer's compute is done (the simulator advances to the next layer's start)."""


class RealClock:
    """The engine's clock: time passes by itself."""

    def routing_learned(self) -> None:
        pass

    def layer_computed(self) -> None:
        pass


_NONE = np.empty(0, np.int64)


@dataclass
class LayerDemand:
    """One MoE layer between `begin` and `finish`."""

    layer: int
    experts: np.ndarray                # [n] distinct experts the cache serves (device), ascending
    routing: LayerRouting | None       # what the policy sees once the compute is issued (None: nothing to see)
    res: DemandResult | None           # the wave acquired and not yet released (None: `waves` must run)
    hit: np.ndarray | None = None      # [n] bool, once every wave is acquired
    cpu: np.ndarray = field(default_factory=lambda: _NONE)   # [m] missed experts computed on the host CPU


class LayerSequence:
    def __init__(self, cache: ExpertCache, policy: Policy, clock: LayerClock) -> None:
        self.cache, self.policy, self.clock = cache, policy, clock

    def begin(self, layer: int, experts: np.ndarray, counts: np.ndarray, routing: LayerRouting | None,
              miss_mode: int = GPU, costs: MissCosts | None = None) -> LayerDemand:
        """experts [n] distinct (ascending), counts [n] tokens per expert. With `miss_mode` CPU or AUTO the misses
        (experts neither resident nor being copied) are split (experts/miss_split.py, by `costs` and the copy work
        the transport has queued ahead of them, under AUTO): the CPU half
        goes to step.cpu and is never acquired (cache.note_cpu notes it, for a copy at the next iteration's start
        under the idle rule). The first wave of the rest is acquired (pinned) when it fits the cache; otherwise
        `waves` acquires them."""
        self.clock.routing_learned()
        self.policy.on_access(layer, experts, counts)
        cpu = _NONE
        if miss_mode != GPU and experts.size:
            absent = np.flatnonzero(~self.cache.resident[layer * self.cache.J + experts])    # [a] positions
            queued = self.cache.transport.queued_seconds() if miss_mode == AUTO else 0.0
            on_cpu = absent[split(counts[absent].astype(np.int64), miss_mode, costs, queued)]
            if on_cpu.size:
                cpu = experts[on_cpu]
                experts = np.delete(experts, on_cpu)
                self.cache.note_cpu(layer, cpu)    # idle rule: copied for reuse from the next iteration's start
        res = self.cache.acquire(layer, experts) if experts.size <= self.cache.capacity else None
        return LayerDemand(layer, experts, routing, res, cpu=cpu)

    def waves(self, step: LayerDemand, compute: Callable[[np.ndarray, DemandResult], None] | None = None) -> None:
        """Every wave of `capacity` experts (the first may be acquired already): acquire, `compute(wave, res)`
        (the compute reading the wave's slots is issued), release. Fills step.hit."""
        cache, experts = self.cache, step.experts
        cap = cache.capacity
        hit = np.zeros(experts.size, dtype=bool)
        for start in range(0, experts.size, cap):
            wave = experts[start:start + cap]
            res = step.res if (step.res is not None and start == 0) else cache.acquire(step.layer, wave)
            if compute is not None:
                compute(wave, res)
            cache.release(res.slots)
            hit[start:start + wave.size] = res.hit
        step.res, step.hit = None, hit

    def finish(self, step: LayerDemand) -> None:
        """The layer's compute has been issued: release its slots, let the policy see the routing, issue
        prefetches."""
        if step.res is not None:
            self.cache.release(step.res.slots)
            step.res, step.hit = None, step.res.hit
        if step.routing is not None:
            self.cache.enqueue(self.policy.on_layer_routed(step.routing))
        self.cache.pump(step.layer)            # prefetches within the issue rule's budget; then the layer computes
        self.clock.layer_computed()

"""The simulator's timed transport: the cost model behind the engine's own ExpertCache.

Simulated time `now` (seconds) is the moment the current layer's compute starts. Copies run on one
copy engine, one after another (like one CUDA copy stream): a copy starts when the engine is free
and takes expert_bytes / bandwidth. A copy is done once its end time <= now. A demand waiting for a
copy is a stall: the clock jumps to the last awaited copy's end. The replay's clock (SimulatedClock)
advances by the per-layer compute time, so prefetches issued at a layer overlap that layer's compute. As
on the GPU, a copy into a slot also waits until the compute that last read the slot has finished (`used`).

With `--miss-compute cpu|auto` a layer's misses are split as the engine splits them (experts/miss_split.py, by
`miss_costs`): a CPU-computed miss copies nothing; as in the engine's captured decode path, the host thread runs the
layer's CPU half from the moment the routing is on the host, taking cpu_layer_s + sum over its experts of
(cpu_expert_s + cpu_token_s * (tokens - 1)), while the copy engine runs the device half's copies, and the device
computes the layer (its device half and the rest of the model) once both are done (timed_kernels.cpu_half; the
wait beyond the copies is stall, and `cpu_wait`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from finemoe.errors import ConfigError
from finemoe.experts.miss_split import MissCosts
from finemoe.experts.transport import Transport
from finemoe.jit import FixedTypes
from finemoe.simulator import timed_kernels
from finemoe.simulator.timed_kernels import TIMES, CopyClock

_NOW, _ENGINE_FREE, _STALL, _BYTES, _CPU_WAIT = (TIMES.names.index(name) for name in
                                                 ("now", "engine_free", "stall", "bytes", "cpu_wait"))


@dataclass(frozen=True)
class CostModel:
    """expert_bytes: bytes moved per expert copy; bandwidth_Bps: host-to-device bytes/s (inf = free
    copies, as on the CPU engine); layer_time_s: compute time of one MoE layer per iteration;
    host_layer_s: host round trip before an offloaded layer's experts can run (the engine's named routing
    sync and its cache work, during which the GPU waits; calibrate it as (TPOT of an all-hit offloading
    run - resident TPOT) / layers). Resident runs have no such round trip. policy_layer_s: the policy's
    own host time per layer (its `on_layer_routed` and eviction choices), which the engine spends while
    the layer computes: the next layer starts after max(layer_time_s, policy_layer_s); calibrate it from
    the engine's `host_after_compute_ms_per_layer` on separate requests. policy_iteration_s: the policy's
    host time once per iteration (its `on_iteration_start` and `on_iteration_end`), while the device idles between
    iterations: charged at each iteration's start; calibrate it from the engine's `host_policy_ms_per_iteration`
    (beyond that of the run `host_layer_s` was calibrated on).
    cpu_expert_s, cpu_token_s, cpu_layer_s: a missed expert computed on the host CPU (`--miss-compute cpu|auto`)
    for one token, each further token of the same expert, and once per layer with any (the hidden states' round
    trip): the engine's calibration prints them (experts/calibration.py)."""

    expert_bytes: int
    bandwidth_Bps: float = 25e9
    layer_time_s: float = 0.0
    host_layer_s: float = 0.0
    policy_layer_s: float = 0.0
    cpu_expert_s: float = 0.0
    cpu_token_s: float = 0.0
    cpu_layer_s: float = 0.0
    policy_iteration_s: float = 0.0

    def __post_init__(self) -> None:
        if self.expert_bytes < 1:
            raise ConfigError(f"expert size must be >= 1 byte, got {self.expert_bytes}")
        if not self.bandwidth_Bps > 0:
            raise ConfigError(f"bandwidth must be positive (or inf), got {self.bandwidth_Bps}")
        if self.layer_time_s < 0:
            raise ConfigError(f"layer time must be >= 0, got {self.layer_time_s}")
        if self.host_layer_s < 0:
            raise ConfigError(f"host time per layer must be >= 0, got {self.host_layer_s}")
        if self.policy_layer_s < 0:
            raise ConfigError(f"policy time per layer must be >= 0, got {self.policy_layer_s}")
        if self.policy_iteration_s < 0:
            raise ConfigError(f"policy time per iteration must be >= 0, got {self.policy_iteration_s}")
        MissCosts(self.copy_s, self.cpu_expert_s, self.cpu_token_s, self.cpu_layer_s)   # checks the CPU times

    @property
    def copy_s(self) -> float:
        return 0.0 if math.isinf(self.bandwidth_Bps) else self.expert_bytes / self.bandwidth_Bps

    @property
    def miss_costs(self) -> MissCosts:
        """What a miss costs each way, as the engine's split reads it (copy: expert_bytes / bandwidth)."""
        return MissCosts(self.copy_s, self.cpu_expert_s, self.cpu_token_s, self.cpu_layer_s)


class TimedTransport(Transport):
    """The cache's transport over a CopyClock (simulator/timed_kernels.py: the copy engine, per-slot copy ends and
    last reads), every method one compiled kernel; the compiled decode loop calls the same kernels."""

    def __init__(self, num_slots: int, cost: CostModel) -> None:
        timed_kernels.warm_up()
        self.cost = cost
        self.state = CopyClock.start(num_slots, cost.copy_s, cost.expert_bytes, cost.layer_time_s)
        self.times = memoryview(self.state.times.view(np.float64))   # the TIMES fields, for fast scalar access
        self._hit = np.zeros(num_slots, bool)
        # the timed kernels bound to this transport's argument types (jit.FixedTypes: no per-call dispatch)
        self.k = SimpleNamespace(**{name: FixedTypes(getattr(timed_kernels, name))
                                    for name in ("load", "copy", "copy_run", "idle_bytes", "queued_seconds",
                                                 "finished", "used", "routing_learned", "cpu_half")})

    now = property(lambda self: self.times[_NOW], lambda self, v: self.times.__setitem__(_NOW, v))
    engine_free = property(lambda self: self.times[_ENGINE_FREE])
    bytes_copied = property(lambda self: int(self.times[_BYTES]),
                            lambda self, v: self.times.__setitem__(_BYTES, float(v)))

    def load(self, slots: np.ndarray, keys: np.ndarray, new: np.ndarray) -> np.ndarray:
        hit = self._hit[:slots.size]
        self.k.load(self.state, np.ascontiguousarray(slots, dtype=np.int64), new, hit)
        return hit.copy()

    def copy(self, slots: np.ndarray, keys: np.ndarray) -> None:
        self.k.copy(self.state, np.ascontiguousarray(slots, dtype=np.int64), slots.size)

    def copy_run(self, slot: int, key: int, lo: int, hi: int, demand: bool) -> None:
        self.k.copy_run(self.state, int(slot), int(lo), int(hi), bool(demand))

    def idle_bytes(self) -> float:
        """The copy engine's idle bytes before the next demand load, by the engine's rule (timed_kernels.idle_bytes)."""
        return float(self.k.idle_bytes(self.state))

    def queued_seconds(self) -> float:
        """The copy engine's work queued after now (timed_kernels.queued_seconds)."""
        return float(self.k.queued_seconds(self.state))

    @property
    def expert_bytes(self) -> int:
        return self.cost.expert_bytes

    @property
    def ahead_max_s(self) -> float:
        """The most prefetch copy time ever queued ahead of a demand copy when it was issued (s)."""
        return float(self.state.times[0]["ahead_max"])

    def finished(self, slots: np.ndarray) -> np.ndarray:
        out = np.empty(slots.size, bool)
        self.k.finished(self.state, np.ascontiguousarray(slots, dtype=np.int64), out)
        return out

    def used(self, slots: np.ndarray) -> None:
        """The layer starting now reads `slots` until now + layer time (called before the clock advances)."""
        self.k.used(self.state, np.ascontiguousarray(slots, dtype=np.int64), slots.size)

    def routing_learned(self, host_s: float) -> None:
        """The host learns the layer's routing after its round trip host_s (timed_kernels.routing_learned)."""
        self.k.routing_learned(self.state, float(host_s))

    def cpu_half(self, seconds: float) -> None:
        """The layer's CPU half ran on the host for `seconds` from its routing, beside its copies; the compute
        starts when both are done (timed_kernels.cpu_half)."""
        self.k.cpu_half(self.state, float(seconds))

    cpu_wait = property(lambda self: self.times[_CPU_WAIT])

    def advance(self, seconds: float) -> None:
        self.times[_NOW] += seconds

    def drain_stall_seconds(self) -> float:
        s, self.times[_STALL] = self.times[_STALL], 0.0
        return s


class SimulatedClock:
    """The simulator's side of a layer (engine/layer_sequence.py LayerClock): the host round trip before the
    layer's experts can run, then the step from the layer's compute start to the next layer's."""

    def __init__(self, transport: TimedTransport, host_layer_s: float, step_s: float) -> None:
        self.transport, self.times, self.host_s, self.step_s = transport, transport.times, host_layer_s, step_s

    def routing_learned(self) -> None:
        self.transport.routing_learned(self.host_s)

    def layer_computed(self) -> None:
        self.times[_NOW] += self.step_s

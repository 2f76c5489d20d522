"""The simulator's timed transport: the cost model behind the engine's own ExpertCache.

Simulated time `now` (seconds) is the moment the current layer's compute starts. Copies run on one
copy engine, one after another (like one CUDA copy stream): a copy starts when the engine is free
and takes expert_bytes / bandwidth. A copy is done once its end time <= now. `wait_compute` is a
demand stall: the clock jumps to the last awaited copy's end. The replay driver advances the clock
by the per-layer compute time, so prefetches issued at a layer overlap that layer's compute. As on the
GPU, a copy into a slot also waits until the compute that last read the slot has finished (`mark_used`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from finemoe.errors import ConfigError
from finemoe.experts.transport import Transport
from finemoe.simulator import timed_kernels
from finemoe.simulator.timed_kernels import demand_timed, pump_timed


@dataclass(frozen=True)
class CostModel:
    """expert_bytes: bytes moved per expert copy; bandwidth_Bps: host-to-device bytes/s (inf = free
    copies, as on the CPU engine); layer_time_s: compute time of one MoE layer per iteration;
    host_layer_s: host round trip before an offloaded layer's experts can run (the engine's named routing
    sync and its cache work, during which the GPU waits; calibrate it as (TPOT of an all-hit offloading
    run - resident TPOT) / layers). Resident runs have no such round trip. policy_layer_s: the policy's
    own host time per layer (its `on_layer_routed` and eviction choices), which the engine spends while
    the layer computes: the next layer starts after max(layer_time_s, policy_layer_s); calibrate it from
    the engine's `critical_path_s_per_iteration` / layers on separate requests."""

    expert_bytes: int
    bandwidth_Bps: float = 25e9
    layer_time_s: float = 0.0
    host_layer_s: float = 0.0
    policy_layer_s: float = 0.0

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

    @property
    def copy_s(self) -> float:
        return 0.0 if math.isinf(self.bandwidth_Bps) else self.expert_bytes / self.bandwidth_Bps


class TimedTransport(Transport):
    """State in numpy arrays (read by the compiled `demand_timed`): clock [now, engine_free, stall, bytes]
    (bytes as float64: exact below 2**53), done_at [N] (end of each slot's last copy), read_until [N] (end of
    the compute that last read each slot). The methods below are the generic transport over the same state."""

    fused_demand = staticmethod(demand_timed)   # ExpertCache runs these instead of the generic path
    fused_pump = staticmethod(pump_timed)

    def __init__(self, num_slots: int, cost: CostModel) -> None:
        if self.fused_demand is not None:
            timed_kernels.warm_up()
        self.cost = cost
        self.copy_s = cost.copy_s
        self.expert_bytes = cost.expert_bytes
        self.clock = np.zeros(4)
        self.done_at = np.zeros(num_slots)
        self.read_until = np.zeros(num_slots)
        self._done = memoryview(self.done_at)                   # fast scalar access
        self.clock_view = memoryview(self.clock)                # also for a driver that advances `now` per layer
        self.kernel_state = (self.clock, self.done_at, self.read_until, float(self.copy_s), float(self.expert_bytes),
                             float(cost.layer_time_s))

    now = property(lambda self: self.clock_view[0], lambda self, v: self.clock_view.__setitem__(0, v))
    engine_free = property(lambda self: self.clock_view[1])
    bytes_copied = property(lambda self: int(self.clock_view[3]),
                            lambda self, v: self.clock_view.__setitem__(3, float(v)))

    def start_copy(self, slot: int, key: int) -> None:
        clock = self.clock_view
        end = max(clock[0], clock[1], self.read_until[slot]) + self.copy_s
        self._done[slot] = end
        clock[1] = end
        clock[3] += self.expert_bytes

    def is_done(self, slot: int) -> bool:
        return self._done[slot] <= self.clock_view[0]

    def wait_compute(self, slots: np.ndarray) -> None:
        if slots.size:
            ready = max(map(self._done.__getitem__, slots.tolist()))
            clock = self.clock_view
            if ready > clock[0]:
                clock[2] += ready - clock[0]
                clock[0] = ready

    def mark_used(self, slots: np.ndarray) -> None:
        """The layer starting now reads `slots` until now + layer time (called before the clock advances)."""
        self.read_until[slots] = self.clock_view[0] + self.cost.layer_time_s

    def advance(self, seconds: float) -> None:
        self.clock_view[0] += seconds

    def drain_stall_seconds(self) -> float:
        s, self.clock_view[2] = self.clock_view[2], 0.0
        return s


class GenericTimedTransport(TimedTransport):
    """The same clock without the compiled fused paths: ExpertCache runs its generic (engine) path over it."""

    fused_demand = None
    fused_pump = None

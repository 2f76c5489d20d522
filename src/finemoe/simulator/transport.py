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
    def __init__(self, num_slots: int, cost: CostModel) -> None:
        self.cost = cost
        self.copy_s = cost.copy_s
        self.expert_bytes = cost.expert_bytes
        self.done_at = [0.0] * num_slots       # [N] simulated end time of each slot's last copy (list: scalar hot path)
        self.read_until = [0.0] * num_slots    # [N] end of the compute that last read each slot
        self.now = 0.0
        self.engine_free = 0.0                 # when the copy engine finishes its queue
        self.bytes_copied = 0
        self._stall = 0.0

    def start_copy(self, slot: int, key: int) -> None:
        end = max(self.now, self.engine_free, self.read_until[slot]) + self.copy_s
        self.done_at[slot] = end
        self.engine_free = end
        self.bytes_copied += self.expert_bytes

    def is_done(self, slot: int) -> bool:
        return self.done_at[slot] <= self.now

    def wait_compute(self, slots: np.ndarray) -> None:
        if slots.size:
            ready = max(map(self.done_at.__getitem__, slots.tolist()))
            if ready > self.now:
                self._stall += ready - self.now
                self.now = ready

    def mark_used(self, slots: np.ndarray) -> None:
        """The layer starting now reads `slots` until now + layer time (called before the clock advances)."""
        until = self.now + self.cost.layer_time_s
        read_until = self.read_until
        for s in slots.tolist():
            read_until[s] = until

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def drain_stall_seconds(self) -> float:
        s, self._stall = self._stall, 0.0
        return s

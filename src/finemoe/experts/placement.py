"""Where the expert cache's slots and the non-expert weights go on several GPUs of one host (`--devices`).

Contract: `place` is a pure function of the cache geometry (slots per device, experts per layer, one expert's
bytes), the devices, the non-expert weights' bytes and the free memory per device. It returns a `Placement`:
  - the cache's N slots in contiguous ranges, device order: slot s lives on device `slot_device[s]`, at index
    `s - first_slot[d]` of that device's pool (the cache and the policies see the N slots as one cache);
  - `layer_device[l]`: the device whose non-expert weights compute decoder layer l. `primary`: every layer on
    devices[0] (the other devices hold cache slots only); `split`: contiguous layer ranges balanced by bytes,
    each device's share proportional to its free memory, as accelerate's balanced device map splits them
    (embeddings and shared weights on devices[0]);
  - `staging[d]`: slots beside device d's own that receive peer copies of experts resident on another device
    while a layer computes on d: J (one layer's experts) on a device that computes layers, when other devices
    hold slots; 0 elsewhere.
Each device holds min(slots_per_device, what its free memory leaves after its non-expert weights and staging)
slots; the total is capped at `total_experts` (the last devices give slots up first). A device whose free memory
cannot hold its non-expert weights is refused with one line. free_bytes None: no memory figure (CPU, tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finemoe.errors import ConfigError

MODES = ("primary", "split")


@dataclass(frozen=True)
class Placement:
    devices: tuple[str, ...]
    first_slot: np.ndarray     # int64 [D+1]: device d holds slots [first_slot[d], first_slot[d+1])
    slot_device: np.ndarray    # int64 [N]
    layer_device: np.ndarray   # int64 [L]
    staging: np.ndarray        # int64 [D] peer-copy landing slots beside each device's own

    @property
    def num_slots(self) -> int:
        return int(self.first_slot[-1])

    def slots_on(self, d: int) -> int:
        return int(self.first_slot[d + 1] - self.first_slot[d])

    def local(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(device [n], index in that device's pool [n]) of cache slots [n]."""
        dev = self.slot_device[slots]
        return dev, slots - self.first_slot[dev]


def split_layers(layer_bytes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Contiguous layer ranges, one per device in order, each device's bytes close to its share (weights [D],
    e.g. free memory) of the total: layer l goes to the device whose share the middle of its bytes falls in."""
    layer_bytes = np.asarray(layer_bytes, np.float64)
    share = np.cumsum(np.asarray(weights, np.float64)) / float(np.sum(weights))      # [D]
    mid = (np.cumsum(layer_bytes) - layer_bytes / 2) / max(float(layer_bytes.sum()), 1.0)   # [L]
    return np.minimum(np.searchsorted(share, mid, side="right"), len(share) - 1).astype(np.int64)


def capped(slots: np.ndarray, total_experts: int) -> np.ndarray:
    """Slots per device [D], their sum capped at every expert once: the last devices give slots up first."""
    slots = np.array(slots, np.int64)
    excess = int(slots.sum()) - total_experts
    for d in range(len(slots) - 1, -1, -1):
        take = min(max(excess, 0), int(slots[d]))
        slots[d] -= take
        excess -= take
    return slots


def place(devices: tuple[str, ...], slots_per_device: int | np.ndarray, total_experts: int, num_experts: int,
          expert_bytes: int, layer_bytes: np.ndarray, shared_bytes: int, free_bytes: np.ndarray | None = None,
          mode: str = "primary") -> Placement:
    """The placement (see the module docstring). layer_bytes [L]: non-expert bytes of each decoder layer;
    shared_bytes: the rest (embeddings, final norm, head); free_bytes [D] or None; slots_per_device: one number
    for every device, or [D] (engine/memory_fit.py's room on each device)."""
    if mode not in MODES:
        raise ConfigError(f"placement {mode!r} is not known: use one of {', '.join(MODES)}")
    D, L = len(devices), len(layer_bytes)
    free = (np.full(D, np.iinfo(np.int64).max // 4, np.int64) if free_bytes is None
            else np.asarray(free_bytes, np.int64))
    layer_device = (np.zeros(L, np.int64) if mode == "primary" or D == 1
                    else split_layers(layer_bytes, np.maximum(free, 1)))
    weights = np.bincount(layer_device, weights=np.asarray(layer_bytes, np.float64), minlength=D).astype(np.int64)
    weights[0] += shared_bytes
    computes = np.bincount(layer_device, minlength=D) > 0
    staging = np.where(computes & (D > 1), num_experts, 0).astype(np.int64)
    room = free - weights - staging * expert_bytes
    for d in np.flatnonzero(free - weights < 0):
        raise ConfigError(f"device {devices[d]} has {free[d]} bytes free but its non-expert weights need "
                          f"{weights[d]}: free memory on it, or list it later in --devices")
    slots = capped(np.minimum(slots_per_device, np.maximum(room, 0) // expert_bytes), total_experts)   # [D]
    first = np.concatenate([[0], np.cumsum(slots)]).astype(np.int64)
    others = first[-1] - slots
    staging = np.minimum(staging, others).astype(np.int64)
    return Placement(tuple(devices), first, np.repeat(np.arange(D, dtype=np.int64), slots), layer_device, staging)

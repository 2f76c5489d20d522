"""Where the expert cache's slots and the non-expert weights go on several GPUs of one host (`--devices`).

Contract: `place` is a pure function of the cache geometry (slots per device, experts per layer), the devices, the
device of every decoder layer (and the non-expert placement mode that put them there) and which decoder layers are
MoE layers. It returns a `Placement`:
  - the cache's N slots in contiguous ranges, device order: slot s lives on device `slot_device[s]`, at index
    `s - first_slot[d]` of that device's pool (the cache and the policies see the N slots as one cache);
  - `mode`: the non-expert placement it was built for (primary or split; recorded, never inferred from the layer
    devices: a split may leave every layer on the first device);
  - `layer_device[i]`: the device that holds decoder layer i's non-expert weights (attention, norms, router, shared
    experts) and computes it; `moe_device[l]`: the same for MoE layer l (where its experts compute);
  - `staging[d]`: slots beside device d's own that receive peer copies of experts resident on another device
    while a layer computes on d: J (one layer's experts) on a device that computes MoE layers, when other devices
    hold slots (at most as many as they hold); 0 elsewhere.
The total is capped at `total_experts` (the last devices give slots up first). How many slots each device's memory
leaves room for is engine/memory_fit.py's job: `slots_per_device` comes from there.

`layer_devices(mode, ...)` gives layer_device for the two non-expert placements (`--non-expert-placement`):
  primary  every decoder layer on devices[0] (the other devices hold cache slots only);
  split    contiguous decoder-layer ranges, one per device in order, each device's bytes close to its share of the
           total (shares: free memory, or equal), as accelerate's balanced device map splits them; the embeddings,
           final norm and head stay on devices[0] and count towards its share.
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
    layer_device: np.ndarray   # int64 [decoder layers]
    moe_device: np.ndarray     # int64 [L] MoE layers
    staging: np.ndarray        # int64 [D] peer-copy landing slots beside each device's own
    mode: str                  # primary or split: the non-expert placement that gave layer_device

    @property
    def num_slots(self) -> int:
        return int(self.first_slot[-1])

    @property
    def splits_layers(self) -> bool:
        """Whether some decoder layer computes off devices[0]."""
        return bool(self.layer_device.any())

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


def layer_devices(mode: str, num_devices: int, layer_bytes: np.ndarray, shared_bytes: int,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """Device of each decoder layer [len(layer_bytes)] under `mode` (see the module docstring). layer_bytes: each
    decoder layer's bytes on its device (non-expert weights, KV cache); shared_bytes: what stays on devices[0]
    whatever the mode (embeddings, final norm, head); weights [D]: each device's share (None: equal)."""
    if mode not in MODES:
        raise ConfigError(f"non-expert placement {mode!r} is not known: use one of {', '.join(MODES)}")
    layer_bytes = np.asarray(layer_bytes, np.int64)
    if mode == "primary" or num_devices == 1:
        return np.zeros(layer_bytes.size, np.int64)
    weights = np.ones(num_devices) if weights is None else np.maximum(np.asarray(weights, np.float64), 1.0)
    return split_layers(np.concatenate([[shared_bytes], layer_bytes]), weights)[1:]   # shared: a layer before all


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
          layer_device: np.ndarray, moe_layers: np.ndarray, mode: str) -> Placement:
    """The placement (see the module docstring). slots_per_device: one number for every device, or [D];
    layer_device [decoder layers]: `layer_devices(mode, ...)`; moe_layers [L]: the decoder index of each MoE layer;
    mode: the non-expert placement that gave layer_device (primary puts every layer on devices[0])."""
    D = len(devices)
    layer_device = np.asarray(layer_device, np.int64)
    if mode not in MODES or (mode == "primary" and layer_device.any()):
        raise ValueError(f"place: mode {mode!r} does not describe layer_device {layer_device.tolist()}")
    moe_device = layer_device[np.asarray(moe_layers, np.int64)]
    slots = capped(np.broadcast_to(np.asarray(slots_per_device, np.int64), (D,)), total_experts)   # [D]
    first = np.concatenate([[0], np.cumsum(slots)]).astype(np.int64)
    computes = np.bincount(moe_device, minlength=D) > 0
    staging = np.where(computes & (D > 1), np.minimum(num_experts, first[-1] - slots), 0).astype(np.int64)
    return Placement(tuple(devices), first, np.repeat(np.arange(D, dtype=np.int64), slots), layer_device,
                     moe_device, staging, mode)

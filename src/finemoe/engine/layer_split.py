"""The decoder layers' non-expert weights over several devices (`--non-expert-placement split`), as accelerate's
device map places them: each decoder layer (attention, norms, router, shared experts) lives on its device and
computes there; the embeddings, rotary tables, final norm and head stay on the first device.

Hidden states follow the layers through PyTorch's public module hooks (no forward is replaced): a forward
pre-hook on every layer that is not on the first device, or whose predecessor is elsewhere, moves the tensors it
is called with (hidden states, masks, position ids, rotary embeddings; nested in tuples, lists and dicts) to its
device; a forward hook on the last layer, when it is not on the first device, moves its output back there, so the
final norm and head (which may be tied to the embeddings) and the sampler run where they always do. The head stays
on the first device for that reason: tied weights are not split, logits land beside the decode path's fixed
buffers, and a step moves one [B, T, H] hidden state back instead of [B, V] logits. KV caches follow their layer:
transformers' cache layers allocate on the device of the keys they first receive (StaticCache, DynamicCache), and
finemoe's SlotKV moves its write positions to each layer's device.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def to_device(value, device: torch.device):
    """`value` with every tensor in it (nested tuples, lists, dicts) on `device`; anything else as it is."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return type(value)(*(to_device(v, device) for v in value)) if hasattr(value, "_fields") else \
            tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class LayerSplit:
    """Places a model's decoder layers on devices and keeps the hooks that carry the hidden states between them.
    `apply(devices, layer_device)` (re)places them; `layer_device` all zeros puts every layer back on the first."""

    def __init__(self, decoders: nn.ModuleList, first: torch.device) -> None:
        self.decoders, self.first = decoders, first
        self.layer_device = np.zeros(len(decoders), np.int64)   # [n] index into `devices` of each decoder layer
        self.devices: tuple[torch.device, ...] = (first,)
        self._handles: list = []

    @property
    def splits(self) -> bool:
        return bool(self.layer_device.any())

    def device_of(self, decoder_index: int) -> torch.device:
        return self.devices[int(self.layer_device[decoder_index])]

    def apply(self, devices: tuple[torch.device, ...], layer_device: np.ndarray) -> bool:
        """Move every decoder layer to devices[layer_device[i]] and hook the moves (by device index: a range
        boundary is hooked even where two indices name the same device, as CPU tests do); True when the layers'
        placement changed (tensors allocated per layer, e.g. static KV caches and captured graphs, are then stale)."""
        layer_device = np.asarray(layer_device, np.int64)
        changed = tuple(devices) != self.devices or not np.array_equal(layer_device, self.layer_device)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.devices, self.layer_device = tuple(devices), layer_device.copy()
        for i, layer in enumerate(self.decoders):
            layer.to(self.device_of(i))
        for i in self.hooked:
            self._handles.append(self.decoders[i].register_forward_pre_hook(self._inputs_to(self.device_of(i)),
                                                                            with_kwargs=True))
        if len(layer_device) and layer_device[-1] != 0:
            last = self.decoders[len(layer_device) - 1]
            self._handles.append(last.register_forward_hook(self._output_to(self.first)))
        return changed

    @property
    def hooked(self) -> list[int]:
        """Decoder layers whose inputs are moved to their device (range boundaries and every layer off the first)."""
        return [i for i, d in enumerate(self.layer_device) if d != 0 or (i > 0 and self.layer_device[i - 1] != d)]

    @staticmethod
    def _inputs_to(device: torch.device):
        def hook(module, args, kwargs):
            return to_device(args, device), to_device(kwargs, device)
        return hook

    @staticmethod
    def _output_to(device: torch.device):
        def hook(module, args, output):
            return to_device(output, device)
        return hook

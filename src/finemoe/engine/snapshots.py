"""Router probabilities on the host, copied right behind each MoE layer's router.

A policy that reads router probabilities (finemoe) gets them on the host. The copy must be queued on the
compute stream before that stream waits for the layer's expert copies: queued after, it would land only
once those copies (about a millisecond per layer when decode is copy-bound) and the layer's experts are
done. `take` starts the copy into a pinned buffer kept per layer (reused every iteration) and records an
event; `wait` is the named host sync for it, made after the layer's compute has been issued, by which
time the copy has long landed. On the CPU both are immediate.
"""
from __future__ import annotations

import torch


class RouterSnapshots:
    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.buffers: list[torch.Tensor | None] = [None] * num_layers
        self.events = [torch.cuda.Event() for _ in range(num_layers)] if self.cuda else []

    def take(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        """probs [T, J] float32 on the device -> its host copy (being filled on CUDA until `wait(layer)`).
        The host tensor is valid until layer `layer` routes again: its buffer is reused."""
        if not self.cuda:
            return probs
        buf = self.buffers[layer]
        if buf is None or buf.shape[0] < probs.shape[0] or buf.shape[1:] != probs.shape[1:]:
            buf = torch.empty((max(probs.shape[0], 8),) + tuple(probs.shape[1:]), dtype=probs.dtype, pin_memory=True)
            self.buffers[layer] = buf
        host = buf[: probs.shape[0]]
        host.copy_(probs, non_blocking=True)
        self.events[layer].record(torch.cuda.current_stream(probs.device))   # the layer's own device
        return host

    def wait(self, layer: int) -> None:
        """HOST SYNC: layer `layer`'s last `take` has landed."""
        if self.cuda:
            self.events[layer].synchronize()

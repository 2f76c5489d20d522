"""Routed-expert weights in host memory, held once (pinned when the device is CUDA)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from finemoe.models.adapters import ExpertGeometry, MoELayer, expert_tensor_names


def _pin_in_place(t: torch.Tensor) -> None:
    """Page-lock an exact-size host tensor with cudaHostRegister. (pin_memory() goes through the caching
    host allocator, which rounds every block up to a power of two: +50% host memory for Qwen1.5-MoE.)"""
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed ({err}) for {t.numel() * t.element_size()} bytes: "
                           "is the host memory lock limit (ulimit -l) too low?")


MMAP_THRESHOLD_MAX = 32 * 2**20   # glibc serves every allocation at least this large from its own mmap


def pinnable_where_it_lies(t: torch.Tensor) -> bool:
    """True for a contiguous CPU tensor that is its storage's only view, start to end, whose memory torch's CPU
    allocator owns (a resizable storage: not a view of a safetensors file mapping) and is large enough to be its
    own mapping, so page-locking it in place pins its bytes and nothing another tensor could pin too. The loader
    leaves stacked expert tensors like this (transformers builds them from per-expert checkpoint weights), and so
    does a model built on the CPU."""
    nbytes = t.numel() * t.element_size()
    storage = t.untyped_storage()
    return (t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0 and nbytes >= MMAP_THRESHOLD_MAX
            and storage.nbytes() == nbytes and storage.resizable())


class HostExpertStore:
    """`tensors[layer][name]` is a host tensor [J, *shape] holding expert weights of one MoE layer.

    Built by `take_from`, which moves each layer's expert tensors off its module one layer at a time
    (so at most one extra layer is alive during the move) and removes them from the module, so
    the model's own forward can no longer see them: only the finemoe experts implementation can run.
    On CUDA a tensor `pinnable_where_it_lies` is page-locked in place (no second copy: the host peak stays one
    copy of the experts); others (device tensors, views of a checkpoint's file mapping) are copied into exact-size
    pinned tensors, one layer at a time.
    """

    def __init__(self, geometry: ExpertGeometry, tensors: list[dict[str, torch.Tensor]], pinned: bool,
                 pinned_in_place: int = 0) -> None:
        self.geometry = geometry
        self.tensors = tensors
        self.pinned = pinned
        self.pinned_in_place = pinned_in_place   # tensors page-locked where the loader left them (no second copy)

    def close(self) -> None:
        """Unpin (page-unlock) the host tensors; the store must not be used afterwards."""
        if self.pinned:
            for layer in self.tensors:
                for t in layer.values():
                    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
            self.pinned = False

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """Each expert tensor's dtype, by name in pool order."""
        return {name: t.dtype for name, t in self.tensors[0].items()}

    @property
    def copy_bytes(self) -> int:
        """Bytes one expert's copy moves (all its tensors)."""
        return self.geometry.expert_bytes

    def expert_sources(self, layer: int, expert: int) -> list[torch.Tensor]:
        """The host tensors one copy of expert `expert` of `layer` moves, in pool order."""
        return [t[expert] for t in self.tensors[layer].values()]

    def release_layer(self, layer: int) -> None:
        """Unpin and drop layer `layer`'s tensors (the packed store took them: experts/packed_store.py)."""
        for t in self.tensors[layer].values():
            if self.pinned:
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        self.tensors[layer] = {}

    @property
    def dtype(self) -> torch.dtype:
        """The experts' dtype (layer 0's first tensor)."""
        return next(iter(self.tensors[0].values())).dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.tensors for t in layer.values())

    @classmethod
    def take_from(cls, layers: list[MoELayer], geometry: ExpertGeometry, pin: bool,
                  show_progress: bool = False) -> HostExpertStore:
        tensors: list[dict[str, torch.Tensor]] = []
        in_place = 0
        for layer in tqdm(layers, desc="experts -> host", disable=None if show_progress else True,
                          unit="layer"):   # disable=None: shown on a terminal only
            moved: dict[str, torch.Tensor] = {}
            for name in expert_tensor_names(layer.experts):
                src = getattr(layer.experts, name).detach()
                if pin and pinnable_where_it_lies(src):
                    _pin_in_place(src)
                    dst = src
                    in_place += 1
                elif pin:
                    dst = torch.empty(src.shape, dtype=src.dtype)
                    _pin_in_place(dst)
                    dst.copy_(src)
                elif src.device.type != "cpu":
                    dst = src.to("cpu")
                else:
                    dst = src.contiguous()
                moved[name] = dst
                delattr(layer.experts, name)  # the module no longer owns a copy
                del src
            tensors.append(moved)
        return cls(geometry, tensors, pin, in_place)

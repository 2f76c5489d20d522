"""The map store: up to C expert maps (one per served iteration and batch row) with their semantic
embeddings, RDY replacement once full, and atomic safetensors persistence.

An expert map is the L x J matrix of every MoE layer's full router softmax for one iteration, stored
layer-major as [L, C, J] so one layer of every stored map is one contiguous [C, J] block (the
trajectory search reads one such block per layer). Cosines of map prefixes (trajectory search) need the norm of every prefix, so the
store keeps `prefix_sq` [C, L]: the cumulative squared norm of each map up to and including layer l.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finemoe.errors import FineMoEError
from finemoe.policies.finemoe import store_kernels as sk
from finemoe.policies.finemoe.arrays import EPS, HOST, ops_for
from finemoe.storage import save_atomic

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def model_identity(geometry: Any, model_name: str | None) -> str:
    """The served model as a store records it (name, layers, experts, top-k, expert tensor shapes): a store is
    only reused by the same model."""
    g = geometry
    shapes = ",".join(f"{k}{list(v)}" for k, v in sorted(g.param_shapes.items()))
    return f"{model_name or 'unknown-model'}|L={g.num_layers}|J={g.num_experts}|top_k={g.top_k}|{shapes}"


class MapStoreError(FineMoEError):
    """A map store file is missing, corrupt, or was built for another model or configuration."""


@dataclass(frozen=True)
class StoreSpec:
    """What a store is valid for. Two stores are compatible when every field but `capacity` agrees."""

    model: str            # model identity: name + expert geometry fingerprint
    num_layers: int       # L
    num_experts: int      # J
    embed_dim: int        # E (semantic embedding size)
    semantic: str         # how embeddings were made (token, prompt, token+prompt)
    distance: int         # d, the prefetch distance RDY weights by
    capacity: int         # C

    def metadata(self) -> dict[str, str]:
        return {"format": "finemoe-map-store", "version": str(FORMAT_VERSION), "spec": json.dumps(asdict(self))}

    def mismatches(self, other: "StoreSpec") -> list[str]:
        a, b = asdict(self), asdict(other)
        return [f"{k}: file has {a[k]!r}, this run needs {b[k]!r}" for k in a if k != "capacity" and a[k] != b[k]]


class MapStore:
    """Fixed-capacity store. `maps` [L, C, J], `sems` [C, E] in `dtype` on `device`; entries [0, size) are valid."""

    def __init__(self, spec: StoreSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if spec.capacity < 1:
            raise MapStoreError(f"map store capacity must be >= 1, got {spec.capacity}")
        self.spec = spec
        L, J, C = spec.num_layers, spec.num_experts, spec.capacity
        self.maps = torch.zeros((L, C, J), dtype=dtype, device=device)        # [L, C, J]
        self.sems = torch.zeros((C, spec.embed_dim), dtype=dtype, device=device)  # [C, E]
        self.sem_norm = torch.zeros(C, dtype=torch.float32, device=device)     # [C]
        self.prefix_sq = torch.zeros((C, L), dtype=torch.float32, device=device)  # [C, L]
        self.prefix_norm = torch.zeros((C, L), dtype=torch.float32, device=device)  # [C, L] sqrt(prefix_sq)
        self._arrays: dict = {}   # (tensor name, backend type) -> the tensor as that backend's array
        # a host float32 store: its upkeep (store_kernels.py) and one-row searches (row_kernels.py) run compiled;
        # False takes the numpy/torch paths
        self.compiled = self.maps.device.type == "cpu" and dtype == torch.float32
        self.size = 0
        self.replaced = 0
        self.version = 0          # bumped by every write: results computed from the store are valid per version

    @property
    def device(self) -> torch.device:
        return self.maps.device

    def array(self, name: str, xp: Any) -> Any:
        """Store tensor `name` as backend `xp`'s array, made once (a host view shares the tensor's memory, so
        it stays current; making a numpy view costs a few us, which the per-layer search should not pay)."""
        key = (name, type(xp))
        if key not in self._arrays:
            self._arrays[key] = xp.view(getattr(self, name))
        return self._arrays[key]

    @property
    def full(self) -> bool:
        return self.size >= self.spec.capacity

    def _write(self, rows: slice | int, maps: Any, sems: Any) -> None:
        """Write maps [N, L*J] / sems [N, E] (or one of each) into `rows`, with their norms (numpy on a host
        store's views: a torch CPU op costs 5-10 us, a numpy op about 1)."""
        L, J, E = self.spec.num_layers, self.spec.num_experts, self.spec.embed_dim
        xp = ops_for(self.device)
        self.version += 1
        stored_maps, stored_sems = self.array("maps", xp), self.array("sems", xp)
        stored_maps[:, rows] = xp.query(maps).reshape(-1, L, J).swapaxes(0, 1).reshape(stored_maps[:, rows].shape)
        stored_sems[rows] = xp.query(sems).reshape(stored_sems[rows].shape)
        m = xp.f32(stored_maps[:, rows]).reshape(L, -1, J).swapaxes(0, 1)         # [N, L, J] as stored
        prefix_sq, prefix_norm = self.array("prefix_sq", xp), self.array("prefix_norm", xp)
        squares = (m * m).sum(2).cumsum(1).reshape(prefix_sq[rows].shape)          # [N, L]
        prefix_sq[rows], prefix_norm[rows] = squares, xp.sqrt_clip(squares, 0.0)
        sem, sem_norm = xp.f32(stored_sems[rows]).reshape(-1, E), self.array("sem_norm", xp)   # [N, E] as stored
        sem_norm[rows] = xp.sqrt_clip((sem * sem).sum(1), 0.0).reshape(sem_norm[rows].shape)

    def rdy(self, emap: Any, sem: Any, map_dots: Any = None) -> Any:
        """RDY(x, y) = (d/L) cos(sem_x, sem_y) + ((L-d)/L) cos(map_x, map_y) for every stored y -> [size] (the
        store's backend: numpy on the host). map_dots [size]: map_x . map_y when the caller has them (the
        trajectory search sums them layer by layer); else summed here (`_map_dots`)."""
        L, J, n = self.spec.num_layers, self.spec.num_experts, self.size
        d = min(self.spec.distance, L)
        xp = ops_for(self.device)
        e, s = xp.query(emap).reshape(L, J), xp.query(sem).reshape(-1)            # [L, J], [E]
        if map_dots is None:
            map_dots = self._map_dots(e, xp)                                      # [n]
        e_norm, s_norm = xp.sqrt_clip((e * e).sum(), 0.0), xp.sqrt_clip((s * s).sum(), 0.0)
        cos_map = xp.query(map_dots) / xp.maximum(self.array("prefix_norm", xp)[:n, -1] * e_norm, EPS)
        cos_sem = (xp.f32(self.array("sems", xp)[:n]) @ s) / xp.maximum(self.array("sem_norm", xp)[:n] * s_norm, EPS)
        return (d / L) * cos_sem + ((L - d) / L) * cos_map

    def _map_dots(self, e: Any, xp: Any) -> Any:
        """map e [L, J] . every stored map -> [size], summed layer by layer on contiguous blocks (one einsum over
        [L, n, J] copies the store first and was 15x slower on the CPU)."""
        maps, n = self.array("maps", xp), self.size
        dots = xp.f32(maps[0, :n]) @ e[0]                                         # [n]
        for layer in range(1, e.shape[0]):
            dots = dots + xp.f32(maps[layer, :n]) @ e[layer]
        return dots

    def add(self, emap: Any, sem: Any, map_dots: Any = None) -> int:
        """Insert one map [L*J] with its embedding [E]; append while not full, else replace the entry
        with the highest RDY (map_dots: see `rdy`). Returns the slot written. A host float32 store takes the
        compiled kernels (store_kernels.py): the same slot and the same stored values, in two calls."""
        compiled = self.compiled
        if compiled:
            emap, sem = HOST.query(emap).reshape(-1), HOST.query(sem).reshape(-1)             # [L*J], [E]
        if not self.full:
            slot = self.size
            self.size += 1
        else:
            slot = self._replaced_slot(emap, sem, map_dots) if compiled else int(self.rdy(emap, sem, map_dots).argmax())
            self.replaced += 1
        if compiled:
            self.version += 1
            sk.write_entry(slot, emap.reshape(self.spec.num_layers, -1), sem, *self._host_arrays)
        else:
            self._write(slot, emap, sem)
        return slot

    def _replaced_slot(self, emap: np.ndarray, sem: np.ndarray, map_dots: Any) -> int:
        """`rdy(...).argmax()` of a full host float32 store: one BLAS product (the embeddings), one kernel."""
        L, n = self.spec.num_layers, self.size
        d = min(self.spec.distance, L)
        _, sems, _, prefix_norm, sem_norm = self._host_arrays
        if map_dots is None:
            map_dots = self._map_dots(emap.reshape(L, -1), HOST)                  # [n]
        return int(sk.rdy_best(HOST.query(map_dots).reshape(-1), sems[:n] @ sem, emap, sem, prefix_norm[:n, -1],
                               sem_norm[:n], np.float32(d / L), np.float32((L - d) / L)))

    @property
    def _host_arrays(self) -> tuple:
        """maps [L, C, J], sems [C, E], prefix_sq [C, L], prefix_norm [C, L], sem_norm [C]: the host views."""
        return tuple(self.array(name, HOST) for name in ("maps", "sems", "prefix_sq", "prefix_norm", "sem_norm"))

    def entry_maps(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Stored maps of entries `rows`, flattened -> [N, L*J] (storage dtype)."""
        m = self.maps[:, rows]                                                  # [L, N, J]
        return m.transpose(0, 1).reshape(m.shape[1], -1)

    def add_many(self, maps: Any, sems: Any, map_dots: Any = None) -> None:
        """maps [N, L*J], sems [N, E]: added one after another (each replacement sees the previous ones).
        map_dots [size, N]: each map's products with the stored maps as they are now (only the first
        map's are still valid once it is added)."""
        for i, (emap, sem) in enumerate(zip(maps, sems)):
            self.add(emap, sem, map_dots[:, i] if map_dots is not None and i == 0 else None)

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Atomic: write a temporary file next to `path`, then rename it over `path`."""
        meta = self.spec.metadata()
        meta["dtype"] = {torch.float32: "float32", torch.float16: "float16"}[self.maps.dtype]
        tensors = {"maps": self.entry_maps(slice(0, self.size)).cpu().contiguous(), "sems": self.sems[: self.size].cpu().contiguous()}
        save_atomic(lambda tmp: save_file(tensors, tmp, metadata=meta), path)

    @classmethod
    def open(cls, path: str | None, spec: "StoreSpec", file_distance: bool, file_capacity: bool,
             device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "MapStore":
        """The store at `path` if that file exists (with `file_distance` / `file_capacity` the file's prefetch
        distance / capacity replace `spec`'s), else a new empty one for `spec`."""
        if not (path and os.path.exists(path)):
            return cls(spec, dtype or torch.float32, device)
        store = cls.load(path, None, device, dtype)
        if file_distance:
            spec = StoreSpec(**{**spec.__dict__, "distance": store.spec.distance})
        if file_capacity:
            spec = StoreSpec(**{**spec.__dict__, "capacity": store.spec.capacity})
        return cls.load(path, spec, device, dtype) if spec != store.spec else store

    @classmethod
    def load(cls, path: str, expect: StoreSpec | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> "MapStore":
        """Read a store; with `expect`, refuse one built for another model/configuration. The file's
        capacity is kept unless `expect.capacity` is larger (then the store grows)."""
        spec, stored_dtype, maps, sems = _read(path)
        if expect is not None:
            bad = spec.mismatches(expect)
            if bad:
                raise MapStoreError(f"map store {path!r} was built for a different model or configuration "
                                    f"({'; '.join(bad)}); rebuild it with `finemoe maps build` for this model "
                                    "and these options, or pass the matching options")
            if expect.capacity > spec.capacity:
                spec = expect
        store = cls(spec, dtype or DTYPES[stored_dtype], device)
        store._write(slice(0, maps.shape[0]), maps, sems)
        store.size = maps.shape[0]
        return store


def _read(path: str) -> tuple[StoreSpec, str, torch.Tensor, torch.Tensor]:
    fix = "rebuild it with `finemoe maps build` (or delete it to start an empty online store)"
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if meta.get("format") != "finemoe-map-store" or keys != {"maps", "sems"}:
                raise MapStoreError(f"{path!r} is not a finemoe map store; {fix}")
            if meta.get("version") != str(FORMAT_VERSION):
                raise MapStoreError(f"map store {path!r} has format version {meta.get('version')!r}, this finemoe "
                                    f"reads version {FORMAT_VERSION}; {fix}")
            spec = StoreSpec(**json.loads(meta["spec"]))
            maps, sems = f.get_tensor("maps"), f.get_tensor("sems")
    except MapStoreError:
        raise
    except FileNotFoundError:
        raise MapStoreError(f"map store {path!r} does not exist; build one with `finemoe maps build`") from None
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers and data
        raise MapStoreError(f"map store {path!r} is truncated or corrupt ({type(e).__name__}: {e}); {fix}") from None
    L, J, E = spec.num_layers, spec.num_experts, spec.embed_dim
    if (maps.dim() != 2 or maps.shape[1] != L * J or sems.shape != (maps.shape[0], E)
            or maps.shape[0] > spec.capacity or meta.get("dtype") not in DTYPES):
        raise MapStoreError(f"map store {path!r} is inconsistent: arrays {tuple(maps.shape)}/{tuple(sems.shape)} "
                            f"do not match L={L}, J={J}, E={E}, C={spec.capacity}; {fix}")
    return spec, meta["dtype"], maps, sems

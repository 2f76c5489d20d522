"""The map store: up to C expert maps (one per served iteration and batch row) with their semantic
embeddings, RDY replacement once full, and atomic safetensors persistence.

An expert map is the L x J matrix of every MoE layer's full router softmax for one iteration, stored
layer-major as [L, C, J] so one layer of every stored map is one contiguous [C, J] block (the
trajectory search reads one such block per layer). Cosines of map prefixes (trajectory search) need the norm of
every prefix, so the store keeps `prefix_sq` [C, L]: the cumulative squared norm of each map up to and including
layer l.
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
from finemoe.jit import njit
from finemoe.storage import save_atomic

FORMAT_VERSION = 1
FILE_DTYPES = ("float32", "float16")       # a file's map dtype (float16: written by older versions); held as float32
EPS32 = np.float32(1e-12)                  # the floor of every cosine's denominator (search and RDY)


@njit
def sum_of_squares(x):
    """sum(x * x) of x [m] float32, in float32, in index order."""
    acc = np.float32(0.0)
    for i in range(x.size):
        acc += x[i] * x[i]
    return acc


@njit
def norm_of(x):
    """The L2 norm of x [m] float32, in float32."""
    return np.float32(np.sqrt(max(sum_of_squares(x), np.float32(0.0))))


@njit
def rdy(map_dots, sem_dots, emap, sem, map_norm, sem_norm, w_sem, w_map, out):
    """RDY = w_sem * cos(sem) + w_map * cos(map) of a new entry (map emap [L*J], embedding sem [E]) against each of
    the n stored ones -> out [n]; returns the first entry of the highest. map_dots [n] = emap . each stored map,
    sem_dots [n] = sem . each stored embedding, map_norm / sem_norm [n] the stored norms; all float32, w_sem / w_map
    float32 (d / L and (L - d) / L)."""
    e_norm, s_norm = norm_of(emap), norm_of(sem)
    best = 0
    for c in range(map_dots.shape[0]):
        dm = max(map_norm[c] * e_norm, EPS32)
        ds = max(sem_norm[c] * s_norm, EPS32)
        out[c] = w_sem * (sem_dots[c] / ds) + w_map * (map_dots[c] / dm)
        if out[c] > out[best]:
            best = c
    return best


@njit
def write_entry(slot, emap, sem, maps, sems, prefix_sq, prefix_norm, sem_norm):
    """Entry `slot` := map emap [L, J] and embedding sem [E] (float32), with its squared norms and norms over layers
    0..l (prefix_sq / prefix_norm [C, L]) and its embedding norm (sem_norm [C]). maps [L, C, J], sems [C, E]."""
    L, J = emap.shape
    acc = np.float32(0.0)
    for layer in range(L):
        maps[layer, slot] = emap[layer]
        acc += sum_of_squares(emap[layer])
        prefix_sq[slot, layer] = acc
        prefix_norm[slot, layer] = np.float32(np.sqrt(max(acc, np.float32(0.0))))
    sems[slot] = sem
    sem_norm[slot] = norm_of(sem)


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

    def mismatches(self, other: StoreSpec) -> list[str]:
        a, b = asdict(self), asdict(other)
        return [f"{k}: file has {a[k]!r}, this run needs {b[k]!r}" for k in a if k != "capacity" and a[k] != b[k]]


class MapStore:
    """Fixed-capacity store in host memory, float32: `maps` [L, C, J], `sems` [C, E] (torch tensors; the `*_np` names
    are numpy views of the same memory, for the compiled search); entries [0, size) are valid."""

    def __init__(self, spec: StoreSpec) -> None:
        if spec.capacity < 1:
            raise MapStoreError(f"map store capacity must be >= 1, got {spec.capacity}")
        self.spec = spec
        L, J, C = spec.num_layers, spec.num_experts, spec.capacity
        self.maps = torch.zeros((L, C, J))                                      # [L, C, J]
        self.sems = torch.zeros((C, spec.embed_dim))                            # [C, E]
        self.sem_norm = torch.zeros(C)                                          # [C]
        self.prefix_sq = torch.zeros((C, L))                                    # [C, L]
        self.prefix_norm = torch.zeros((C, L))                                  # [C, L] sqrt(prefix_sq)
        self.maps_np, self.sems_np, self.sem_norm_np, self.prefix_sq_np, self.prefix_norm_np = (
            t.numpy() for t in (self.maps, self.sems, self.sem_norm, self.prefix_sq, self.prefix_norm))
        self.size = 0
        self.replaced = 0
        self.version = 0          # bumped by every write: results computed from the store are valid per version

    @property
    def full(self) -> bool:
        return self.size >= self.spec.capacity

    def rdy(self, emap: Any, sem: Any, map_dots: Any = None) -> tuple[np.ndarray, int]:
        """RDY(x, y) = (d/L) cos(sem_x, sem_y) + ((L-d)/L) cos(map_x, map_y) of map emap [L*J] and embedding sem [E]
        against every stored y -> ([size] float32, the entry a full store replaces: the first of the highest).
        map_dots [size]: map_x . map_y when the caller has them (the trajectory search summed them layer by layer);
        else summed here, one product per layer on contiguous [n, J] blocks."""
        L, n = self.spec.num_layers, self.size
        d = min(self.spec.distance, L)
        emap, sem = host_f32(emap), host_f32(sem)                                        # [L*J], [E]
        if map_dots is None:
            e = emap.reshape(L, -1)
            map_dots = self.maps_np[0, :n] @ e[0]                                # [n]
            for layer in range(1, L):
                map_dots = map_dots + self.maps_np[layer, :n] @ e[layer]
        out = np.empty(n, np.float32)
        best = rdy(host_f32(map_dots), self.sems_np[:n] @ sem, emap, sem, self.prefix_norm_np[:n, -1],
                   self.sem_norm_np[:n], np.float32(d / L), np.float32((L - d) / L), out)
        return out, int(best)

    def add(self, emap: Any, sem: Any, map_dots: Any = None) -> int:
        """Insert one map [L*J] with its embedding [E]; append while not full, else replace the entry with the
        highest RDY (map_dots: see `rdy`). Returns the slot written."""
        emap, sem = host_f32(emap), host_f32(sem)
        if not self.full:
            slot = self.size
            self.size += 1
        else:
            slot = self.rdy(emap, sem, map_dots)[1]
            self.replaced += 1
        self._write(slot, emap, sem)
        return slot

    def _write(self, slot: int, emap: np.ndarray, sem: np.ndarray) -> None:
        self.version += 1
        write_entry(slot, emap.reshape(self.spec.num_layers, -1), sem, self.maps_np, self.sems_np,
                    self.prefix_sq_np, self.prefix_norm_np, self.sem_norm_np)

    def entry_maps(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Stored maps of entries `rows`, flattened -> [N, L*J] float32."""
        m = self.maps[:, rows]                                                  # [L, N, J]
        return m.transpose(0, 1).reshape(m.shape[1], -1)

    def add_many(self, maps: Any, sems: Any, map_dots: Any = None) -> None:
        """maps [N, L*J], sems [N, E]: added one after another (each replacement sees the previous ones).
        map_dots [size, N]: each map's products with the stored maps as they are now (only the first
        map's are still valid once it is added)."""
        for i, (emap, sem) in enumerate(zip(maps, sems)):
            self.add(emap, sem, map_dots[:, i] if map_dots is not None and i == 0 else None)

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, path: str, extra_metadata: dict[str, str] | None = None) -> None:
        """Atomic: write a temporary file next to `path`, then rename it over `path`. `extra_metadata`: more
        safetensors metadata entries (a `maps build` checkpoint's progress); readers of the store ignore them."""
        meta = {**(extra_metadata or {}), **self.spec.metadata()}
        meta["dtype"] = "float32"
        tensors = {"maps": self.entry_maps(slice(0, self.size)).contiguous(),
                   "sems": self.sems[: self.size].contiguous()}
        save_atomic(lambda tmp: save_file(tensors, tmp, metadata=meta), path)

    @classmethod
    def open(cls, path: str | None, spec: StoreSpec, file_distance: bool, file_capacity: bool) -> MapStore:
        """The store at `path` if that file exists (with `file_distance` / `file_capacity` the file's prefetch
        distance / capacity replace `spec`'s), else a new empty one for `spec`."""
        if not (path and os.path.exists(path)):
            return cls(spec)
        store = cls.load(path)
        if file_distance:
            spec = StoreSpec(**{**spec.__dict__, "distance": store.spec.distance})
        if file_capacity:
            spec = StoreSpec(**{**spec.__dict__, "capacity": store.spec.capacity})
        return cls.load(path, spec) if spec != store.spec else store

    @classmethod
    def load(cls, path: str, expect: StoreSpec | None = None) -> MapStore:
        """Read a store; with `expect`, refuse one built for another model/configuration. The file's
        capacity is kept unless `expect.capacity` is larger (then the store grows)."""
        spec, maps, sems = _read(path)
        if expect is not None:
            bad = spec.mismatches(expect)
            if bad:
                raise MapStoreError(f"map store {path!r} was built for a different model or configuration "
                                    f"({'; '.join(bad)}); rebuild it with `finemoe maps build` for this model "
                                    "and these options, or pass the matching options")
            if expect.capacity > spec.capacity:
                spec = expect
        store = cls(spec)
        for emap, sem in zip(host_f32(maps), host_f32(sems)):
            store._write(store.size, emap, sem)
            store.size += 1
        return store


def host_f32(x: Any) -> np.ndarray:
    """A torch tensor or array (any dtype) -> C-contiguous float32 numpy on the host."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _read(path: str) -> tuple[StoreSpec, torch.Tensor, torch.Tensor]:
    fix = "rebuild it with `finemoe maps build` (or delete it to start an empty online store)"
    if os.path.isdir(path):
        raise MapStoreError(f"map store {path!r} is a directory: give the store's file path")
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
            or maps.shape[0] > spec.capacity or meta.get("dtype") not in FILE_DTYPES):
        raise MapStoreError(f"map store {path!r} is inconsistent: arrays {tuple(maps.shape)}/{tuple(sems.shape)} "
                            f"do not match L={L}, J={J}, E={E}, C={spec.capacity}; {fix}")
    return spec, maps, sems

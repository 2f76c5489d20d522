"""The few array operations the map-store search needs, for a store in host memory or on a CUDA device.

A host store is searched in numpy on zero-copy views of its tensors: a numpy op on these small arrays
costs about 1 us, a torch CPU op 5-10 us, and at ~20 ops per routed layer the torch overhead was most of
the policy's host time (0.87 ms per layer step in the simulator, against a 0.35 ms GPU layer). A device
store keeps torch. The search code is written once against `ArrayOps`; `ops_for(device)` picks one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

EPS = 1e-12   # the floor of every cosine's denominator (search and RDY)


class ArrayOps(ABC):
    """Backend of the search math. Arrays are numpy (host) or torch (device); indices are int64."""

    @abstractmethod
    def view(self, t: torch.Tensor) -> Any:
        """A store tensor as this backend's array, sharing memory (no copy)."""

    @abstractmethod
    def query(self, x: Any) -> Any:
        """A query (torch tensor or numpy array, any device) -> float32 array of this backend."""

    @abstractmethod
    def ids(self, x: Any) -> Any:
        """Entry indices (torch tensor, numpy array or lists) -> int64 array of this backend."""

    @abstractmethod
    def f32(self, x: Any) -> Any:
        """x as float32 (no copy when it already is)."""

    @abstractmethod
    def sqrt_clip(self, x: Any, low: float) -> Any:
        """sqrt(max(x, low))."""

    @abstractmethod
    def maximum(self, x: Any, low: float) -> Any:
        """max(x, low) elementwise."""

    @abstractmethod
    def best(self, sim: Any, k: int) -> tuple[Any, Any]:
        """sim [n, B] -> (entries [K, B] int64, values [K, B]), best first, K = min(k, n). k = 1 is the
        first maximum; on the host, ties go to the lower entry for any k."""

    @abstractmethod
    def zeros(self, shape: tuple) -> Any:
        """float32 zeros."""

    @abstractmethod
    def stack(self, xs: list) -> Any:
        """Stack along a new first axis."""

    @abstractmethod
    def indices(self, rows: list) -> Any:
        """Nested lists of ints -> int64 array on this backend's device."""

    @abstractmethod
    def values(self, rows: list) -> Any:
        """Nested lists of floats -> float32 array."""


class HostOps(ArrayOps):
    def view(self, t):
        return t.detach().numpy()

    def query(self, x):
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32).numpy()
        return np.asarray(x, dtype=np.float32)

    def ids(self, x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        return np.asarray(x, dtype=np.int64)

    def f32(self, x):
        return x.astype(np.float32, copy=False)

    def sqrt_clip(self, x, low):
        return np.sqrt(np.maximum(x, low))

    def maximum(self, x, low):
        return np.maximum(x, low)

    def best(self, sim, k):
        n, B = sim.shape
        if k == 1:
            idx = sim.argmax(0)[None]                                             # [1, B]
            return idx, sim[idx, np.arange(B)[None, :]]
        if k >= n:
            idx = np.argsort(-sim, axis=0, kind="stable")                         # [n, B]
            return idx, sim[idx, np.arange(B)[None, :]]
        idx, val = np.empty((k, B), dtype=np.int64), np.empty((k, B), dtype=sim.dtype)
        for b in range(B):   # per batch row: a 1-D partition is ~6x faster than a sort along axis 0
            col = sim[:, b]                                                       # [n]
            ranked = ranked_top_k(col, k)
            if ranked is None:                          # a tie at the cut: lower ids win
                idx[:, b] = np.argsort(-col, kind="stable")[:k]
                val[:, b] = col[idx[:, b]]
            else:
                idx[:, b], val[:, b] = ranked
        return idx, val                                                           # [K, B] each

    def zeros(self, shape):
        return np.zeros(shape, dtype=np.float32)

    def stack(self, xs):
        return np.stack(xs)

    def indices(self, rows):
        return np.asarray(rows, dtype=np.int64)

    def values(self, rows):
        return np.asarray(rows, dtype=np.float32)


def ranked_top_k(col: np.ndarray, k: int) -> tuple[list[int], list[float]] | None:
    """col [n] (n > k) -> (ids of the k largest, best first, ties to the lower id; their values), from one
    partition; None when the k-th and the (k+1)-th largest tie (the caller breaks the cut by index)."""
    n = col.size
    part = np.argpartition(col, n - k - 1)              # [n - k:] the k best, [n - k - 1] the next best
    top = part[n - k:]
    vals = col[top]
    if vals.min() == col[part[n - k - 1]]:
        return None
    pairs = sorted(zip((-vals).tolist(), top.tolist()))
    return [i for _, i in pairs], [-v for v, _ in pairs]


class DeviceOps(ArrayOps):
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def view(self, t):
        return t

    def query(self, x):
        return torch.as_tensor(x).to(self.device, torch.float32)

    def ids(self, x):
        return torch.as_tensor(x).to(self.device, torch.int64)

    def f32(self, x):
        return x.float()

    def sqrt_clip(self, x, low):
        return x.clamp_min(low).sqrt()

    def maximum(self, x, low):
        return x.clamp_min(low)

    def best(self, sim, k):
        if k == 1:
            score, idx = sim.max(0)
            return idx[None], score[None]
        score, idx = sim.topk(min(k, sim.shape[0]), dim=0)
        return idx, score

    def zeros(self, shape):
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def stack(self, xs):
        return torch.stack(xs)

    def indices(self, rows):
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    def values(self, rows):
        return torch.tensor(rows, dtype=torch.float32, device=self.device)


HOST = HostOps()


def ops_for(device: torch.device) -> ArrayOps:
    return HOST if device.type == "cpu" else DeviceOps(device)


def to_host(x: Any) -> np.ndarray:
    """HOST SYNC for a device array: any search result -> numpy."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

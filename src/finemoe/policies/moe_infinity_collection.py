"""MoE-Infinity's collection of past requests' expert activation matrices, with what matching needs precomputed."""
from __future__ import annotations

import json

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from finemoe.errors import ConfigError
from finemoe.policies import kernels
from finemoe.storage import save_atomic

COLLECTION_VERSION = 1
MEAN = -1   # the row index `best` gives a fresh request (no tokens routed yet): the collection's mean matrix
# Relative gap below which two products may be ordered differently by the running sums and by the defining one:
# a float64 sum of N non-negative terms is within N * 2**-53 of the true value, so 1e-6 holds for N up to ~4e9
# increments (tokens x layers x top-k of one request).
TOL = 1e-6


def usage_share(unit: np.ndarray) -> np.ndarray:
    """[..., L, J] float32 -> each layer's row divided by its sum (share of that layer's uses), float32."""
    return unit / np.maximum(unit.sum(axis=-1, keepdims=True), 1e-12)


class ActivationCollection:
    """Up to `capacity` expert activation matrices (EAMs) of past requests, flattened to [L*J] counts.
    Full: the oldest is replaced (ring). Rows are kept unit-normalised (float32), and each row's per-layer
    usage share is computed once, when the row is stored (a prefetch only reads it).

    Matching is defined as the argmax of the product of a request's matrix with each stored unit row, each
    product computed in float64 from the float32 values (every term exact) summed in key order, the lowest row
    among equals (kernels.exact_best). Callers keep each request's products with every row up to date as its
    counts grow (float64, `by_key`, summed in arrival order): those differ from the defining sum by less than
    `tol` relative (TOL), so when no other row is within `tol` of the best the argmax is certain;
    otherwise the defining products of the rows within `tol` are computed and decide."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int) -> None:
        self.L, self.J, self.capacity = num_layers, num_experts, capacity
        self.unit = np.zeros((capacity, num_layers * num_experts), np.float32)    # [C, L*J]
        self.by_key = np.zeros((num_layers * num_experts, capacity))              # [L*J, C] float64 unit.T
        self.tol = TOL
        self.share = np.zeros((capacity, num_layers, num_experts), np.float32)    # [C, L, J]
        self._mean_share: np.ndarray | None = None                                # [L, J], None = not computed
        self.size = 0
        self.next = 0
        self.near = np.zeros(capacity, np.int64)                                  # [C] rows near the best match

    def add(self, eam: np.ndarray) -> int | None:
        """Store `eam` [L*J]; returns the row it replaced or filled (None: an all-zero matrix is not stored)."""
        norm = float(np.linalg.norm(eam))
        if norm == 0.0:
            return None
        row = self.next
        self.unit[row] = eam / norm
        self.by_key[:, row] = self.unit[row]
        self.share[row] = usage_share(self.unit[row].reshape(self.L, self.J))
        self._mean_share = None
        self.next = (self.next + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        return row

    def best(self, eams: np.ndarray, dots: np.ndarray, fresh: np.ndarray | None) -> list[int] | None:
        """eams [B, L*J] float32 counts, dots [B, C] float64 their products with every row (kept by the
        caller, see the class) -> per request the row of the most cosine-similar stored matrix, MEAN for the
        rows flagged in `fresh` [B] bool (None: no row is fresh). None while the collection is empty."""
        if self.size == 0:
            return None
        if fresh is not None and fresh.all():
            return [MEAN] * fresh.size
        live = dots[:, :self.size]                                                  # [B, C']
        if fresh is None and live.shape[0] == 1:    # one request: compiled
            best, m = kernels.near_best(live[0], 1 - self.tol, self.near)
            return [int(best if m == 1 else kernels.exact_best(eams[0], self.unit, self.near, m))]
        best = live.argmax(axis=1)                                                  # [B]
        near = np.count_nonzero(live >= live.max(axis=1, keepdims=True) * (1 - self.tol), axis=1)   # [B]
        if fresh is not None:
            near[fresh] = 1
        for b in np.flatnonzero(near > 1).tolist():   # a near tie: the defining products of the near rows decide
            _, m = kernels.near_best(live[b], 1 - self.tol, self.near)
            best[b] = kernels.exact_best(eams[b], self.unit, self.near, m)
        if fresh is not None:
            best[fresh] = MEAN
        return best.tolist()

    def share_of(self, row: int) -> np.ndarray:
        """Row `row`'s (or, for MEAN, the collection's mean matrix's) per-layer usage share [L, J] float32."""
        if row != MEAN:
            return self.share[row]
        if self._mean_share is None:
            mean = self.unit[:self.size].mean(axis=0)                               # [L*J]
            self._mean_share = usage_share(mean.reshape(self.L, self.J))
        return self._mean_share

    def save(self, path: str) -> None:
        """Atomic: write a temp file next to `path`, then rename over it."""
        meta = {"version": COLLECTION_VERSION, "num_layers": self.L, "num_experts": self.J, "next": self.next}
        unit = np.ascontiguousarray(self.unit[:self.size])
        save_atomic(lambda tmp: save_file({"unit": unit}, tmp,
                                          metadata={"finemoe_eam_collection": json.dumps(meta)}), path)

    def load(self, path: str) -> None:
        try:
            with safe_open(path, framework="numpy") as f:
                meta = json.loads((f.metadata() or {})["finemoe_eam_collection"])
                unit = f.get_tensor("unit")
        except Exception as e:
            raise ConfigError(f"moe-infinity: cannot read activation collection {path!r}: {e}; delete it to start "
                              "an empty one") from None
        if (meta["num_layers"], meta["num_experts"]) != (self.L, self.J) or meta["version"] != COLLECTION_VERSION:
            raise ConfigError(f"moe-infinity: collection {path!r} is for {meta['num_layers']} layers x "
                              f"{meta['num_experts']} experts (version {meta['version']}); this model has {self.L} x "
                              f"{self.J}: pass another collection path")
        keep = unit[-self.capacity:]
        self.size = keep.shape[0]
        self.unit[:self.size] = keep
        self.by_key[:, :self.size] = keep.T
        self.share[:self.size] = usage_share(self.unit[:self.size].reshape(self.size, self.L, self.J))
        self._mean_share = None
        self.next = meta["next"] % self.capacity if self.size == self.capacity else self.size

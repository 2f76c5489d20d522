"""MoE-Infinity's collection of past requests' expert activation matrices, with what matching needs precomputed."""
from __future__ import annotations

import json

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from finemoe.errors import ConfigError
from finemoe.policies.moe_infinity.matching import MEAN, StoredRows, match_rows
from finemoe.storage import save_atomic

COLLECTION_VERSION = 1
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

    Matching (matching.py) reads them through `stored()`."""

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

    def stored(self) -> StoredRows:
        """The arrays matching reads (compiled), with the current size."""
        return StoredRows(self.unit, self.by_key, self.share, self.near, self.size, 1 - self.tol)

    def best(self, eams: np.ndarray, dots: np.ndarray, fresh: np.ndarray) -> np.ndarray | None:
        """eams [B, K] float32 counts, dots [B, C] float64 their running products with every row (kept by the
        caller, see matching.py), fresh [B] bool -> per request the row of the most cosine-similar stored matrix
        (matching.match), MEAN for the fresh rows. None while the collection is empty."""
        if self.size == 0:
            return None
        out = np.empty(eams.shape[0], np.int64)
        match_rows(eams, dots, fresh, self.stored(), out)
        return out

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

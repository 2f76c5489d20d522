"""One routed layer's token probabilities as the batch rows' queries: a decode row is its token, a prefill row
the mean (or the last) of its real prompt tokens."""
from __future__ import annotations

import numpy as np

from finemoe.policies.base import LayerRouting
from finemoe.policies.finemoe.map_store import host_f32


class RowQueries:
    """probs [T, J] -> per batch row [B, J]. The token-to-row reduction is built once per iteration (every layer
    of an iteration hands over the same token rows)."""

    def __init__(self, prefill: str) -> None:
        self.prefill = prefill                                  # "mean" or "last"
        self._reduce: tuple[int, np.ndarray | None] = (-1, None)   # (iteration, [B, T] matrix or None: identity)

    def of(self, routing: LayerRouting, batch: int, iteration: int) -> np.ndarray:
        """[B, J] float32, possibly a view of `probs` (read before the callback returns)."""
        probs, rows = routing.probs, routing.token_rows
        key, reduce = self._reduce
        if key != iteration:
            identity = probs.shape[0] == batch and np.array_equal(rows, np.arange(batch))
            reduce = None if identity else self._reduction_matrix(rows, batch)
            self._reduce = (iteration, reduce)
        if reduce is None:
            return host_f32(probs)
        return reduce @ host_f32(probs)          # [B, T] @ [T, J] numpy (a torch CPU matmul took ms at times)

    def _reduction_matrix(self, rows: np.ndarray, B: int) -> np.ndarray:
        R = np.zeros((B, rows.size), dtype=np.float32)                          # [B, T]
        for b in range(B):
            idx = np.flatnonzero(rows == b)
            if idx.size == 0:
                continue
            if self.prefill == "last":
                R[b, idx[-1]] = 1.0
            else:
                R[b, idx] = 1.0 / idx.size
        return R

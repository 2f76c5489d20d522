"""The recorded model's input embedding over the token ids a trace holds: what finemoe's token semantics read when a
trace is replayed without the model (`finemoe trace` records these rows; `finemoe simulate` uses them by default).
"""
from __future__ import annotations

import numpy as np
import torch

from finemoe.errors import TraceError


class TokenRows(torch.nn.Module):
    """An input embedding restricted to the token ids `ids` [U] (sorted, unique) with rows `weight` [U, H] float32:
    called on token ids [...] it returns their rows [..., H], as the model's embedding module would; an id outside
    `ids` is an error (the trace did not record it)."""

    def __init__(self, ids: np.ndarray, rows: np.ndarray) -> None:
        super().__init__()
        self.ids_np = np.ascontiguousarray(ids, dtype=np.int64)                   # [U]
        self.rows_np = np.ascontiguousarray(rows, dtype=np.float32)               # [U, H]
        self.ids = torch.from_numpy(self.ids_np)
        self.weight = torch.from_numpy(self.rows_np)

    def host_rows(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [...] (numpy) -> their rows [..., H] float32 numpy."""
        pos = np.searchsorted(self.ids_np, ids).clip(max=self.ids_np.size - 1)
        if not np.array_equal(self.ids_np[pos], ids):
            missing = np.setdiff1d(ids, self.ids_np)[:5].tolist()
            raise TraceError(f"the trace's input-embedding rows do not cover token ids {missing}: re-record the "
                             "trace with `finemoe trace`, or pass --embed-from MODEL_DIR")
        return self.rows_np[pos]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.host_rows(ids.cpu().numpy()))


def embedding_rows(embed, token_ids: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique ids [U] int32, their rows [U, H] float32) of `token_ids` under the model's input-embedding
    module `embed` (HOST SYNC: the rows are copied to the host)."""
    ids = np.unique(token_ids).astype(np.int32)
    with torch.inference_mode():
        rows = embed(torch.as_tensor(ids, dtype=torch.long, device=device)).float().cpu().numpy()
    return ids, rows

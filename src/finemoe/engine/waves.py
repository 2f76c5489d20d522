"""The waves path of a MoE layer: for a layer that needs more distinct experts than the cache has slots
(a long prefill on a small budget), or whose slots span more than MAX_GROUPS. Eager only."""
from __future__ import annotations

import numpy as np
import torch


def run_in_waves(runtime, ex, hidden, top_k_index, top_k_weights, demand) -> torch.Tensor:
    """Rows path, for layers that need more experts than the cache has slots (waves of `capacity`
    experts, through the layer sequence's `waves`) or whose slots span more than MAX_GROUPS. Each (token, k)
    row gets exactly the value the one-shot path computes (transformers' function with unit weights, then the
    same weight product); rows are reduced once at the end, in the same order as the unmodified model."""
    T, k = top_k_index.shape
    flat_idx = top_k_index.reshape(-1)                                   # [S]
    flat_w = top_k_weights.reshape(-1, 1)                                # [S, 1]
    ones = torch.ones_like(flat_w)
    weighted = None                                                      # [S, H] once the first rows compute
    w = runtime.max_groups

    def compute(wave: np.ndarray, res) -> None:
        nonlocal weighted
        slots = runtime.cache.transport.compute_slots(res.slots)          # [n] in the compute pool
        for lo in np.unique(slots // w) * w:                              # slot windows of <= max_groups
            sel = (slots >= lo) & (slots < lo + w)
            lut = torch.full((runtime.g.num_experts,), -1, dtype=torch.int64)
            lut[torch.from_numpy(wave[sel])] = torch.from_numpy(slots[sel] - lo)
            slot_of_row = lut.to(flat_idx.device)[flat_idx]                # [S], -1 outside this window
            rows = torch.nonzero(slot_of_row >= 0).squeeze(1)            # [R]  (syncs)
            proj = ex.compute_fn(ex.window(int(lo), int(lo) + w), hidden[rows // k],
                                 slot_of_row[rows].unsqueeze(1), ones[rows])  # [R, H]
            part = proj * flat_w[rows]                                   # [R, H] transformers' dtype rule
            if weighted is None:
                weighted = torch.zeros((T * k, hidden.shape[-1]), dtype=part.dtype, device=hidden.device)
            weighted[rows] = part

    runtime.sequence.waves(demand, compute)
    return weighted.view(T, k, -1).sum(dim=1).to(hidden.dtype)

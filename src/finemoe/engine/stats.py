"""What the offload runtime counts and carries between the halves of a layer's host work."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class IterationStats:
    """Per-row (request) counts for one forward pass, plus totals."""

    row_hits: np.ndarray
    row_misses: np.ndarray
    bytes_copied: int
    stall_s: float


@dataclass
class LayerStep:
    """One MoE layer between `begin_layer` and `finish_layer`: its routing on the host and where its experts sit."""

    layer: int
    topk: np.ndarray            # [T, k] expert ids
    experts: np.ndarray         # [n] distinct experts the live tokens need
    res: object                 # DemandResult (slots, hit) or None
    lo: int                     # slot window [lo, hi) the compute reads; -1: waves path
    hi: int
    routing: object = None      # LayerRouting the policy sees once the compute is issued (probs on the host)


@dataclass
class RuntimeTotals:
    hits: np.ndarray          # [L]
    misses: np.ndarray        # [L]
    bytes_copied: int = 0
    stall_s: float = 0.0
    iterations: int = 0
    critical_policy_s: float = 0.0
    extra: dict = field(default_factory=dict)

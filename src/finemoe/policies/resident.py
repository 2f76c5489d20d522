"""Everything resident: the no-offload reference."""
from __future__ import annotations

import numpy as np

from finemoe.policies.base import Policy, register_policy


@register_policy
class ResidentPolicy(Policy):
    name = "resident"
    description = ("No offloading: every routed expert is copied to the device once at start "
                   "(the budget must hold all experts). The latency reference every policy is compared with.")
    keeps_all_resident = True

    def select_victims(self, candidates: np.ndarray, n: int, for_prefetch: bool) -> np.ndarray:
        raise RuntimeError("resident policy never evicts: the cache holds every expert")

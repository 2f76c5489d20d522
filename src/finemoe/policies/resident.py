"""Everything resident: the no-offload reference."""
from __future__ import annotations

from finemoe.policies.base import Policy, register_policy


@register_policy
class ResidentPolicy(Policy):
    name = "resident"
    description = ("No offloading: every routed expert is copied to the device once at start "
                   "(the budget must hold all experts). The latency reference every policy is compared with.")
    keeps_all_resident = True

    def eviction_rank(self) -> None:
        """Never evicts: the cache holds every expert."""
        return None

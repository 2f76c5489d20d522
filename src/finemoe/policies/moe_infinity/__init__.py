"""moe-infinity: request-level expert activation matrices matched against past requests' (policy.py); the
collection of past matrices (collection.py), their compiled counting and matching (matching.py) and the compiled
per-layer steps (steps.py)."""
from finemoe.policies.moe_infinity.collection import ActivationCollection
from finemoe.policies.moe_infinity.policy import MoEInfinityPolicy

__all__ = ["ActivationCollection", "MoEInfinityPolicy"]

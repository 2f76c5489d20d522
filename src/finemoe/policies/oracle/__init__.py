"""The oracle: the clairvoyant bound (policy.py) over a recorded trace's timeline of uses (future.py), its Belady
order and prefetch as compiled functions (belady.py)."""
from finemoe.policies.oracle.future import FutureIndex
from finemoe.policies.oracle.policy import OraclePolicy

__all__ = ["FutureIndex", "OraclePolicy"]

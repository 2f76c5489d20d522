"""The FineMoE policy package: map store, search, selection, embeddings, planner, worker, policy."""
from finemoe.policies.finemoe.map_store import MapStore, MapStoreError, StoreSpec
from finemoe.policies.finemoe.policy import FineMoEPolicy

__all__ = ["FineMoEPolicy", "MapStore", "MapStoreError", "StoreSpec"]

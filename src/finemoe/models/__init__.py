"""Model adapters, the checkpoint loader and the built-in default model."""
from finemoe.models.adapters import (ExpertGeometry, MoEFamily, MoELayer, family_for, find_moe_layers,
                                     geometry_of, supported_model_types)

__all__ = ["ExpertGeometry", "MoEFamily", "MoELayer", "family_for", "find_moe_layers", "geometry_of",
           "supported_model_types"]

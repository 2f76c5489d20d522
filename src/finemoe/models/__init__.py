"""Generic MoE discovery, the checkpoint loader and the built-in default model."""
from finemoe.models.adapters import ExpertGeometry, MoELayer, find_moe_layers, geometry_of

__all__ = ["ExpertGeometry", "MoELayer", "find_moe_layers", "geometry_of"]

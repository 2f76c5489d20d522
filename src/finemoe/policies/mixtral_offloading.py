"""Mixtral-offloading: layer l+1's router applied to layer l's hidden states predicts the next layer's experts."""
from __future__ import annotations

from finemoe.policies.base import register_policy
from finemoe.policies.speculative import SpeculativePolicy


@register_policy
class MixtralOffloadingPolicy(SpeculativePolicy):
    name = "mixtral-offloading"
    description = (
        "Follows Mixtral-offloading (Eliseev & Mazur, 2023): after layer l routes, layer l+1's router is applied "
        "to layer l's MoE input and every token's top-k under it is prefetched; LRU eviction. Needs the model "
        "(engine only). Not expressed: their per-layer LRU cache of fixed size and mixed quantisation; our cache is "
        "one pool shared by all layers.")
    stride = 1

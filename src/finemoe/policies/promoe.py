"""ProMoE: layer l+d's router applied to layer l's hidden states predicts the experts `stride` layers ahead."""
from __future__ import annotations

from finemoe.errors import ConfigError
from finemoe.policies.base import register_policy
from finemoe.policies.speculative import SpeculativePolicy


@register_policy
class ProMoEPolicy(SpeculativePolicy):
    name = "promoe"
    description = (
        "Follows ProMoE's stride prefetching (Song et al., 2024): after layer l routes, layer l+d's router is "
        "applied to layer l's MoE input (d = `stride`, default 2; layer 0 also predicts layers 1..d-1) and the "
        "predicted top-k are prefetched; LRU eviction. Needs the model (engine only). Not expressed: ProMoE's "
        "learned per-layer predictors (we reuse the routers as they are) and its chunked, pipelined copies.")

    def __init__(self, stride: int = 2) -> None:
        if int(stride) < 1:
            raise ConfigError(f"promoe: stride must be >= 1, got {stride}")
        self.stride = int(stride)

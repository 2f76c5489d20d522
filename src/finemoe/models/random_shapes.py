"""Random-weight models with real models' shapes, built directly on the device.

`--model random:qwen1.5-moe-a2.7b` serves a model with Qwen1.5-MoE-A2.7B's exact shapes and seeded
random weights, so latency and memory can be measured at real scale with no download. It is labelled
as random everywhere it is reported: its text is noise and its routing is almost uniform.
`random:qwen1.5-moe-a2.7b@12` overrides the number of layers (e.g. to match a routing trace).
"""
from __future__ import annotations

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from finemoe.errors import ModelLoadError

PREFIX = "random:"


def qwen15_moe_a27b(layers: int = 24) -> Qwen2MoeConfig:
    """Qwen1.5-MoE-A2.7B: 24 layers, 60 experts, top-4, hidden 2048, expert 1408, shared expert 5632."""
    return Qwen2MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                          shared_expert_intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                          num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
                          max_position_embeddings=8192, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)


SHAPES = {"qwen1.5-moe-a2.7b": qwen15_moe_a27b}


def is_random_spec(model: str | None) -> bool:
    return model is not None and model.startswith(PREFIX)


def build_random(spec: str, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[Qwen2MoeForCausalLM, str]:
    """Build `random:NAME[@LAYERS]` on `device` (weights initialised there, not on the CPU)."""
    name, _, layers = spec[len(PREFIX):].partition("@")
    if name not in SHAPES:
        raise ModelLoadError(f"unknown random model shape {name!r}; known: {', '.join(sorted(SHAPES))}")
    try:
        config = SHAPES[name](int(layers)) if layers else SHAPES[name]()
    except ValueError:
        raise ModelLoadError(f"{spec!r}: the layer count after '@' must be an integer") from None
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2MoeForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    layers = config.num_hidden_layers
    return model.eval(), f"{name} shapes ({layers} layers), seeded random {dtype} weights, not trained"

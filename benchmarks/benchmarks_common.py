"""Shared by the GPU benchmark scripts: the Qwen1.5-MoE-A2.7B-shaped random-weight model."""
from __future__ import annotations

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM


def qwen15_moe_config(layers: int, tiny: bool = False) -> Qwen2MoeConfig:
    """Qwen1.5-MoE-A2.7B's shapes; `tiny` shrinks widths (CPU smoke runs of this script)."""
    h, e, s, v = (2048, 1408, 5632, 151936) if not tiny else (128, 64, 256, 1024)
    return Qwen2MoeConfig(vocab_size=v, hidden_size=h, intermediate_size=s, moe_intermediate_size=e,
                          shared_expert_intermediate_size=s, num_hidden_layers=layers, num_attention_heads=16,
                          num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
                          max_position_embeddings=8192, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)


def build_model(layers: int, seed: int, device: str, tiny: bool) -> Qwen2MoeForCausalLM:
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = Qwen2MoeForCausalLM(qwen15_moe_config(layers, tiny))
    finally:
        torch.set_default_dtype(prev)
    return model.eval()

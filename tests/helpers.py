"""Tiny random MoE checkpoints for every supported architecture, and the plain-transformers reference.

Each builder returns a transformers config with tiny widths, 8 routed experts and top-2 routing.
`save_tiny_checkpoint` saves a seeded random model plus the built-in byte-level tokenizer (vocab 258),
so a directory made here loads through finemoe's real loading path like any hub checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

from finemoe.engine import Engine
from finemoe.models.default import default_tokenizer
from finemoe.traces.format import Trace

VOCAB, EOS_ID, PAD_ID = 258, 256, 257   # the built-in tokenizer: 256 bytes, <|endoftext|>, <|pad|>
NUM_EXPERTS, TOP_K = 8, 2
ROUTER_STD = 1.0   # decisive routing: tokens spread over many experts instead of near-uniform logits

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
               tie_word_embeddings=False, num_experts_per_tok=TOP_K)


def _qwen2_moe():
    return transformers.Qwen2MoeConfig(**_COMMON, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=48, num_experts=NUM_EXPERTS,
                                       norm_topk_prob=False)


def _qwen3_moe():
    return transformers.Qwen3MoeConfig(**_COMMON, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=32,
                                       num_experts=NUM_EXPERTS, norm_topk_prob=True)


def _mixtral():
    return transformers.MixtralConfig(**_COMMON, num_hidden_layers=2, intermediate_size=32,
                                      num_local_experts=NUM_EXPERTS)


def _phimoe():
    # sparsemixer routing is defined for top-2 only; jitter noise only acts in training mode
    return transformers.PhimoeConfig(**_COMMON, num_hidden_layers=2, intermediate_size=32,
                                     num_local_experts=NUM_EXPERTS, router_jitter_noise=0.01, input_jitter_noise=0.0)


def _olmoe():
    return transformers.OlmoeConfig(**_COMMON, num_hidden_layers=2, intermediate_size=32, num_experts=NUM_EXPERTS)


def _deepseek_v2():
    # layer 0 is dense (first_k_dense_replace), layers 1-2 are MoE with one shared expert
    # MLA attention has as many key/value heads as query heads
    return transformers.DeepseekV2Config(
        **{**_COMMON, "num_key_value_heads": 4}, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32,
        n_routed_experts=NUM_EXPERTS, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8, topk_method="greedy", norm_topk_prob=False)


def _gpt_oss():
    return transformers.GptOssConfig(**_COMMON, num_hidden_layers=2, intermediate_size=32, head_dim=8,
                                     num_local_experts=NUM_EXPERTS, sliding_window=8,
                                     layer_types=["sliding_attention", "full_attention"])


CONFIGS = {"qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "phimoe": _phimoe,
           "olmoe": _olmoe, "deepseek_v2": _deepseek_v2, "gpt_oss": _gpt_oss}


def _sharpen_routers(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Redraw every router weight with std ROUTER_STD (random init's 0.02 gives near-uniform routing)."""
    for layer in model.model.layers:
        block = layer.mlp
        router = getattr(block, "gate", None) if hasattr(block, "experts") else None
        router = getattr(block, "router", router)
        if router is not None and hasattr(block, "experts"):
            w = router.weight
            w.data.copy_(torch.randn(w.shape, generator=gen) * ROUTER_STD)
            if getattr(router, "bias", None) is not None:
                router.bias.data.copy_(torch.randn(router.bias.shape, generator=gen) * 0.1)


def save_tiny_checkpoint(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Build `arch`'s tiny model with seeded random weights and save it with a tokenizer into `out`.
    `overrides` set config fields (e.g. output_router_logits=True)."""
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
        _sharpen_routers(model, torch.Generator().manual_seed(seed + 1))
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(out)
    default_tokenizer().save_pretrained(out)
    return out


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, S] and attention mask [B, S], the layout both the engine and generate() use."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.inference_mode()
def reference_greedy(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int) -> list[list[int]]:
    """Plain transformers greedy decoding of a left-padded batch, EOS disabled (every row runs to the end)."""
    ids, mask = left_pad(prompts, pad_id)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=None, pad_token_id=pad_id)
    return out[:, ids.shape[1]:].tolist()


def victims(rank, keys: list[int], n: int, for_prefetch: bool = False) -> list[int]:
    """The first n keys a cache holding `keys` (slot i holds keys[i], none in use) evicts for a demand load (or a
    prefetch), as the cache's compiled scan picks them from a policy's EvictionRank `rank`."""
    import numpy as np

    from finemoe.experts import slot_kernels as sk
    st = sk.SlotState.empty(rank.primary.size, len(keys))
    for slot, key in enumerate(keys):
        st.key_of[slot], st.slot_of[key] = key, slot
        st.resident[key] = True
    st.tally["filled"] = len(keys)
    out = np.zeros(len(keys), np.int64)
    blocked, limit = (sk.PREFETCH_BLOCKED, rank.limit[0]) if for_prefetch else (sk.DEMAND_BLOCKED, np.inf)
    m = sk.rank_victims(st, n, blocked, limit, rank, out, 0)
    return st.key_of[out[:m]].tolist()


def topic_trace(seed=0, R=8, L=6, J=16, k=2, prompt=3, iters=10):
    """R requests on 3 topics (each topic prefers its own experts per layer), full router probabilities."""
    rng = np.random.default_rng(seed)
    prefs = rng.standard_normal((3, L, J)).astype(np.float32) * 2.0
    rows = prompt + iters - 1
    topics = rng.integers(0, 3, R)
    logits = prefs[np.repeat(topics, rows)] + rng.standard_normal((R * rows, L, J)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    topk = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    return Trace("topics", L, J, k, offsets=np.arange(R + 1) * rows, prompt_lens=np.full(R, prompt),
                 iterations=np.full(R, iters), token_ids=rng.integers(0, 50, R * rows), topk=topk,
                 probs=probs.astype(np.float16), expert_bytes=1000)


class LogitsEngine(Engine):
    """Keeps every iteration's last-token logits [B, V]."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: list[torch.Tensor] = []

    def iterate(self, it, token_rows, forward):
        out = super().iterate(it, token_rows, forward)
        self.logits.append(out.clone())
        return out

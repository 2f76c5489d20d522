"""Every causal-LM model type of the installed transformers whose modeling uses the experts interface, and a tiny
random config for each: the support table's source (tests/test_supported_models.py).

The list is read from transformers itself (its config and causal-LM auto mappings, and the text of each modeling
file), never written by hand, so a newer transformers brings its new MoE families into the test on its own.
A tiny config is the model type's own default config with every size field that exists shrunk to TINY, and every
per-layer list (layer_types, mlp_layer_types, ...) cut to LAYERS entries keeping every kind of layer (so e.g. a
dense first layer and a full-attention layer survive). OVERRIDES holds the few fields a family's validation insists
on, and the layer patterns of hybrids whose default leaves layer_types unset (one layer of each kind, 2 layers).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES, model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from finemoe.models.adapters import find_moe_layers
from finemoe.models.default import default_tokenizer

NUM_EXPERTS, TOP_K, LAYERS = 8, 2, 3
VOCAB, EOS_ID, PAD_ID = 258, 256, 257   # the built-in byte-level tokenizer
ROUTER_STD = 1.0   # decisive routing: tokens spread over many experts instead of near-uniform logits

TINY = dict(
    vocab_size=VOCAB, bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
    max_position_embeddings=256, unpadded_vocab_size=VOCAB, num_hidden_layers=LAYERS, num_layers=LAYERS,
    hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
    intermediate_size=64, moe_intermediate_size=32, expert_ffn_hidden_size=32, ffn_hidden_size=64,
    shared_expert_intermediate_size=48, shared_intermediate_size=48, shared_experts_intermediate_size=48,
    moe_shared_expert_intermediate_size=48, dense_intermediate_size=64, first_dense_intermediate_size=64,
    prefix_dense_intermediate_size=64, mlp_only_intermediate_size=64,
    num_experts=NUM_EXPERTS, num_local_experts=NUM_EXPERTS, n_routed_experts=NUM_EXPERTS, moe_num_experts=NUM_EXPERTS,
    num_experts_per_tok=TOP_K, num_experts_per_token=TOP_K, moe_topk=TOP_K, moe_k=TOP_K, top_k_experts=TOP_K,
    n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1, n_group=1, topk_group=1, num_expert_group=1,
    first_k_dense_replace=0, num_dense_layers=0, num_nextn_predict_layers=0,
    kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, qk_head_dim=16,
    index_head_dim=8, index_n_heads=2, index_topk=4,
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_head_dim=8, linear_num_heads=4, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
    router_jitter_noise=0.0, input_jitter_noise=0.0)

OVERRIDES = {
    "gemma4_text": dict(enable_moe_block=True),       # MoE blocks are opt-in
    "zaya": dict(num_experts_per_tok=1),              # its validation allows top-1 only
    "jamba": dict(attn_layer_period=3, attn_layer_offset=2),   # one attention layer among the three
    # hybrids whose default layer_types is None (derived later or read as-is): one layer of each kind, both MoE
    "lfm2_moe": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"], num_dense_layers=0),
    "granitemoehybrid": dict(num_hidden_layers=2, layer_types=["linear_attention", "attention"], mamba_n_heads=4,
                             mamba_d_state=8, mamba_chunk_size=8),
    "kolibri1_1": dict(num_hidden_layers=2, layer_types=["sliding_attention", "indexed_attention"], mlp_only_layers=[],
                       head_dim=16, index_num_heads=2, index_topk=4, index_pool_size=16, index_compression=4,
                       index_layers=[1], kv_source_layers=[0, 1], index_num_local_tokens=2, index_num_sink_tokens=1),
    # "full_attention" as its checkpoints spell it (newer transformers reads it as indexed attention, which needs
    # the indexer sizes, default None)
    "qwen4_exp_text": dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], hc_lowrank=8,
                           indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
                           indexer_compress_ratio=2),
}


@dataclass(frozen=True)
class ModelType:
    """One model type whose modeling file uses `@use_experts_implementation`."""

    name: str
    causal_lm: str | None      # its AutoModelForCausalLM class name, None for a multimodal or sub-model config


def _uses_experts_interface(model_type: str) -> bool:
    module = model_type_to_module_name(model_type)
    spec = importlib.util.find_spec(f"transformers.models.{module}")
    if spec is None or not spec.submodule_search_locations:
        return False
    path = Path(next(iter(spec.submodule_search_locations))) / f"modeling_{module}.py"
    return path.is_file() and "@use_experts_implementation" in path.read_text()


@cache
def experts_model_types() -> tuple[ModelType, ...]:
    """Every model type of the installed transformers whose modeling uses the experts interface, sorted."""
    return tuple(ModelType(t, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(t)) for t in sorted(CONFIG_MAPPING_NAMES)
                 if _uses_experts_interface(t))


def _per_layer(values: list) -> list:
    """A per-layer list cut to LAYERS entries: the first, then every other kind once, then the last repeated."""
    kinds = list(dict.fromkeys(map(repr, values)))
    others = [values[[repr(v) for v in values].index(k)] for k in kinds if k != repr(values[0])]
    return ([values[0], *others] + [values[-1]] * LAYERS)[:LAYERS]


def tiny_config(model_type: str):
    """The model type's default config with TINY sizes (see the module docstring)."""
    cls = CONFIG_MAPPING[model_type]
    default = cls().to_dict()
    layers = default.get("num_hidden_layers", default.get("num_layers"))
    kwargs = {k: v for k, v in TINY.items() if k in default}
    for key, value in default.items():
        if isinstance(value, list) and layers and len(value) == layers and key not in kwargs:
            kwargs[key] = _per_layer(value)
    if "kv_lora_rank" in default:   # multi-head latent attention has as many key/value heads as query heads
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)
    kwargs.update(OVERRIDES.get(model_type, {}))
    return cls(**kwargs)


def build_tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A seeded random tiny model with decisive routers (router weights redrawn with std ROUTER_STD)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
        gen = torch.Generator().manual_seed(seed + 1)
        for layer in find_moe_layers(model):
            w = getattr(layer.router, "weight", None)
            if w is not None:
                w.data.copy_(torch.randn(w.shape, generator=gen) * ROUTER_STD)
    finally:
        torch.random.set_rng_state(state)
    return model


def save_tiny(model: torch.nn.Module, out: Path) -> Path:
    """save_pretrained plus the built-in tokenizer: a directory finemoe loads like any hub checkpoint."""
    model.save_pretrained(out)
    default_tokenizer().save_pretrained(out)
    return out

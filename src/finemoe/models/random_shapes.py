"""Random-weight models with real models' shapes, built directly on a device.

`--model random:qwen3-30b-a3b` serves a model with Qwen3-30B-A3B's exact shapes and seeded random weights, so
latency and memory can be measured at real scale with no download. It is labelled as random everywhere it is
reported: its text is noise and its routing is almost uniform. `random:NAME@LAYERS` overrides the number of
decoder layers (e.g. to match a routing trace, or to fit host memory).

Each shape's numbers are its published config.json's (the hub repository named in `source`); fields not listed
keep transformers' defaults for that model type. A shape whose model type the installed transformers lacks is
refused with the version it has.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, Qwen2MoeConfig
from transformers.initialization import no_init_weights
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from finemoe.errors import ModelLoadError
from finemoe.models.adapters import find_moe_layers

PREFIX = "random:"


@dataclass(frozen=True)
class Shape:
    """A published MoE model's shape: its transformers model type and config.json numbers."""

    model_type: str
    source: str                   # the hub repository whose config.json the numbers are from
    fields: dict = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return self.fields["num_hidden_layers"]

    def config(self, layers: int | None = None) -> PretrainedConfig:
        if self.model_type not in CONFIG_MAPPING_NAMES:
            raise ModelLoadError(f"this shape needs transformers' model type {self.model_type!r}, which "
                                 f"transformers {transformers.__version__} does not have: upgrade transformers")
        return AutoConfig.for_model(self.model_type, **{**self.fields, "num_hidden_layers": layers or self.layers})


SHAPES: dict[str, Shape] = {
    # 24 layers, 60 experts, top-4, hidden 2048, expert 1408, shared expert 5632
    "qwen1.5-moe-a2.7b": Shape("qwen2_moe", "Qwen/Qwen1.5-MoE-A2.7B", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        num_experts=60, num_experts_per_tok=4, norm_topk_prob=False, max_position_embeddings=8192,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)),
    # 48 layers, 128 experts, top-8, hidden 2048, expert 768, GQA 32/4 heads of 128 (transformers' Qwen3MoeConfig
    # docstring names Qwen/Qwen3-30B-A3B-Base; its defaults have 24 layers, the published config has 48)
    "qwen3-30b-a3b": Shape("qwen3_moe", "Qwen/Qwen3-30B-A3B", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, max_position_embeddings=40960, tie_word_embeddings=False)),
    # 24 layers, 32 experts, top-4, hidden 2880, expert 2880 with biases, 64/8 heads of 64, alternating sliding
    # (128) and full attention (transformers' GptOssConfig defaults are gpt-oss-120b's: 36 layers, 128 experts).
    # The published checkpoint stores experts in MXFP4; these are bf16.
    "gpt-oss-20b": Shape("gpt_oss", "openai/gpt-oss-20b", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        max_position_embeddings=131072, tie_word_embeddings=False)),
    # 32 layers, 8 experts, top-2, hidden 4096, expert 14336, 32/8 heads (transformers' MixtralConfig defaults)
    "mixtral-8x7b": Shape("mixtral", "mistralai/Mixtral-8x7B-v0.1", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        tie_word_embeddings=False)),
    # 27 layers (first dense), 64 experts, top-6, 2 shared, hidden 2048, expert 1408, MLA (kv_lora_rank 512)
    "deepseek-v2-lite": Shape("deepseek_v2", "deepseek-ai/DeepSeek-V2-Lite", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, head_dim=64, topk_method="greedy",
        norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=163840, tie_word_embeddings=False)),
    # 16 layers, 64 experts, top-8, hidden 2048, expert 1024 (transformers' OlmoeConfig defaults, expert width
    # from the published config: the default is 2048)
    "olmoe-1b-7b": Shape("olmoe", "allenai/OLMoE-1B-7B-0924", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
        max_position_embeddings=4096, tie_word_embeddings=False)),
    # 46 layers (first dense), 128 experts, top-8, 1 shared, hidden 4096, expert 1408, 96/8 heads of 128
    "glm-4.5-air": Shape("glm4_moe", "zai-org/GLM-4.5-Air", dict(
        vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=46, first_k_dense_replace=1, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
        partial_rotary_factor=0.5, attention_bias=True, n_routed_experts=128, num_experts_per_tok=8,
        n_shared_experts=1, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True,
        use_qk_norm=False, max_position_embeddings=131072, tie_word_embeddings=False)),
    # 40 layers (3 linear-attention : 1 full), 256 experts, top-8, 1 shared, hidden 2048, expert 512 (transformers'
    # Qwen3_5MoeTextConfig docstring names Qwen/Qwen3.5-35B-A3B; these are its defaults)
    "qwen3.5-35b-a3b": Shape("qwen3_5_moe_text", "Qwen/Qwen3.5-35B-A3B", dict(
        vocab_size=248320, hidden_size=2048, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2, head_dim=256, num_experts=256,
        num_experts_per_tok=8, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, tie_word_embeddings=False)),
    # 48 layers (3 linear-attention : 1 full), 512 experts, top-10, 1 shared, hidden 2048, expert 512 (transformers'
    # Qwen3NextConfig docstring names Qwen/Qwen3-Next-80B-A3B-Instruct; these are its defaults). 155 GB of bf16
    # experts: more than a 128 GiB host holds at all 48 layers.
    "qwen3-next-80b-a3b": Shape("qwen3_next", "Qwen/Qwen3-Next-80B-A3B-Instruct", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, num_experts=512, num_experts_per_tok=10, norm_topk_prob=True, linear_num_key_heads=16,
        linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, tie_word_embeddings=False)),
}


def qwen15_moe_a27b(layers: int = 24) -> Qwen2MoeConfig:
    """Qwen1.5-MoE-A2.7B's config (the benchmarks' default shape)."""
    return SHAPES["qwen1.5-moe-a2.7b"].config(layers)


def is_random_spec(model: str | None) -> bool:
    return model is not None and model.startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, int | None]:
    """`random:NAME[@LAYERS]` -> (NAME, LAYERS or None); a one-line error for an unknown name or a bad count."""
    name, _, layers = spec[len(PREFIX):].partition("@")
    if name not in SHAPES:
        raise ModelLoadError(f"unknown random model shape {name!r}; known: {', '.join(sorted(SHAPES))}")
    if not layers:
        return name, None
    if not layers.isdigit() or int(layers) < 1:
        raise ModelLoadError(f"{spec!r}: the layer count after '@' must be an integer >= 1")
    return name, int(layers)


def random_config(spec: str) -> PretrainedConfig:
    name, layers = parse_spec(spec)
    try:
        return SHAPES[name].config(layers)
    except ModelLoadError as e:
        raise ModelLoadError(f"{spec!r}: {e}") from None


def build_random(spec: str, device: str, dtype: torch.dtype, seed: int = 0,
                 overrides: dict | None = None) -> tuple[torch.nn.Module, str]:
    """Build `random:NAME[@LAYERS]` on `device` (weights initialised there: pass "cpu" for a model larger than
    the accelerator; the engine moves the experts to host memory before the rest to the accelerator; "meta" for
    the skeleton alone). `overrides`: config fields to change (e.g. smaller widths for a test).

    The routed experts, nearly all the weights, are drawn N(0, initializer_range) by `_fill_experts` in parallel
    (torch's CPU normal_ runs on one thread: a 30B-parameter shape took minutes); every other weight is
    initialised by the model's own init_weights, which leaves parameters marked initialised alone (transformers'
    `_is_hf_initialized`, as from_pretrained marks loaded ones). A parameter that init leaves unset is refused."""
    config = random_config(spec)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    name, _ = parse_spec(spec)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(prev)
    if torch.device(device).type != "meta":
        experts = _fill_experts(model, config.initializer_range, seed)
        filled = {id(p) for p in experts}
        others = [(n, p) for n, p in model.named_parameters() if id(p) not in filled]
        for _, p in others:
            p.data.fill_(float("nan"))          # so that a weight init does not reach cannot pass unnoticed
        model.init_weights()
        for p in experts:
            del p._is_hf_initialized
        unset = [n for n, p in others if p.is_floating_point() and torch.isnan(p).any()]
        if unset:
            raise ModelLoadError(f"{spec}: transformers' init left {unset[:3]} unset; this shape cannot be built "
                                 "with random weights under this transformers")
    layers = config.num_hidden_layers
    return model.eval(), f"{name} shapes ({layers} layers), seeded random {dtype} weights, not trained"


def _fill_experts(model: torch.nn.Module, std: float, seed: int) -> list[torch.nn.Parameter]:
    """Every routed expert's weight matrices ([E, ...] parameters of the experts modules, ndim >= 3) ~ N(0, std),
    one expert's slice per task on a pool of torch's thread count, each slice from its own generator seeded by
    (seed, parameter, expert): the same weights whatever the thread count. Marked initialised; returns them."""
    params = [p for layer in find_moe_layers(model) for p in layer.experts.parameters() if p.ndim >= 3]
    cpu = all(p.device.type == "cpu" for p in params)
    workers = torch.get_num_threads() if cpu else 1

    def fill(job: tuple[int, int]) -> None:
        i, e = job
        g = torch.Generator(device=params[i].device).manual_seed(seed * 1_000_003 + i * 10_007 + e)
        params[i].data[e].normal_(0.0, std, generator=g)

    jobs = [(i, e) for i, p in enumerate(params) for e in range(p.shape[0])]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fill, jobs))
    for p in params:
        p._is_hf_initialized = True
    return params

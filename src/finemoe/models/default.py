"""The built-in default model: a small Qwen2-MoE defined in code with seeded random weights.

It exists so `finemoe generate` and `finemoe serve` work on a fresh machine with no download and
no GPU. It is NOT a trained model: its text is noise and its routing is close to uniform. Use
`--model` for anything that measures prediction quality.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen2MoeForCausalLM

DEFAULT_MODEL_NAME = "finemoe-builtin-random-qwen2moe"
DEFAULT_MODEL_LABEL = "built-in Qwen2-MoE (seeded random weights, not trained)"
_SPECIALS = ["<|endoftext|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}<|endoftext|>\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


def default_config() -> Qwen2MoeConfig:
    """Qwen1.5-MoE's routing geometry (60 experts, top-4, shared expert, no top-k renorm), tiny widths."""
    return Qwen2MoeConfig(
        vocab_size=258, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        shared_expert_intermediate_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
        num_experts=60, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1,
        max_position_embeddings=4096, bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)


def default_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code: 256 byte tokens plus <|endoftext|> (256) and <|pad|> (257)."""
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    byte_chars.sort(key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=_SPECIALS[0], bos_token=_SPECIALS[0],
                                   pad_token=_SPECIALS[1])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, others to 256+n."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cp = ord(char)
    if cp in printable:
        return cp
    others = [b for b in range(256) if b not in printable]
    return others[cp - 256]


def build_default_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> Qwen2MoeForCausalLM:
    """Deterministic: the same seed gives the same weights on every machine (built on the CPU)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Qwen2MoeForCausalLM(default_config()).to(dtype)
    finally:
        torch.random.set_rng_state(gen_state)
    model.eval()
    return model

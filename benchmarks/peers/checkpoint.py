"""Save a random-weight Qwen2-MoE as a Hugging Face checkpoint that llama.cpp's converter accepts.

The converter reads the tokenizer next to the weights and llama.cpp refuses a BPE vocabulary without merges, which
finemoe's built-in byte-level tokenizer has none of (models/default.py). The tokenizer saved here is the same kind
(byte-level BPE, `<|endoftext|>` and `<|pad|>`) with a few merges learned from a fixed text, so it is deterministic.
It is never used to tokenize benchmark prompts: every runner is fed token ids (llama-bench random ones, the others
the routing trace's prompts).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|pad|>"]
MERGE_TEXT = "the mixture of experts model routes every token to a few experts " * 8


def byte_bpe_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Byte-level BPE: 256 byte tokens, the two specials, and merges learned from MERGE_TEXT up to `vocab_size`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([MERGE_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], bos_token=SPECIALS[0],
                                   pad_token=SPECIALS[1])


def save_checkpoint(model: torch.nn.Module, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `model` (weights cast to `dtype`, moved to the host) and the byte-level tokenizer to `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.to(device="cpu", dtype=dtype).save_pretrained(path)
    byte_bpe_tokenizer().save_pretrained(path)
    return path

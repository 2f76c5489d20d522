"""Prompts for a benchmark: read JSONL files, subsample, wrap in a template and tokenize."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finemoe.errors import ConfigError
from finemoe.prompts import read_prompts


@dataclass(frozen=True)
class Prompt:
    text: str            # the prompt as written in the file
    ids: list[int]       # templated, tokenized, truncated
    source: str          # file it came from


def load_texts(paths: list[str], limit: int | None, seed: int) -> list[tuple[str, str]]:
    """(text, file) pairs; with `limit`, a seeded random subsample of at most `limit` prompts per file
    (in file order)."""
    out = []
    for path in paths:
        records = read_prompts(path)
        keep = np.arange(len(records))
        if limit is not None and limit < len(records):
            keep = np.sort(np.random.default_rng(seed).choice(len(records), size=limit, replace=False))
        out.extend((records[i]["prompt"], path) for i in keep.tolist())
    return out


def tokenize(tokenizer, texts: list[tuple[str, str]], template: str, max_prompt_tokens: int | None) -> list[Prompt]:
    """Template each prompt (must contain {prompt}); truncate the templated prompt's body so the whole
    prompt is at most `max_prompt_tokens` tokens while keeping the template's tail (e.g. 'Assistant:')."""
    if "{prompt}" not in template:
        raise ConfigError("--template must contain {prompt}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ConfigError("--max-prompt-tokens must be >= 1")
    head, _, tail = template.partition("{prompt}")
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    out = []
    for text, src in texts:
        body = tokenizer(head + text, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens is not None:
            body = body[:max(max_prompt_tokens - len(tail_ids), 1)]
        out.append(Prompt(text, body + tail_ids, src))
    return out

"""Prompt files: JSONL, one record per line with a string `prompt` field (read by the CLI and the evaluation)."""
from __future__ import annotations

import json

from finemoe.errors import ConfigError


def read_prompts(path: str, field: str = "prompt") -> list[dict]:
    """JSONL with a `prompt` field per line -> list of records (clear errors for bad lines)."""
    records = []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not valid UTF-8 (byte {e.start + 1} of the line): "
                                      "save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                    raise ConfigError(f"{path}:{n}: each line needs a string field {field!r}")
                records.append(rec)
    except OSError as e:
        raise ConfigError(f"cannot read prompts file {path!r}: {e.strerror}") from None
    if not records:
        raise ConfigError(f"prompts file {path!r} holds no prompts")
    return records


def templated(tokenizer, records: list[dict], template: str, max_tokens: int | None) -> list[tuple[str, list[int]]]:
    """(templated text, its token ids cut to the first `max_tokens`) per record; `template` holds {prompt}."""
    if "{prompt}" not in template:
        raise ConfigError("--template must contain {prompt}")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError("--max-prompt-tokens must be >= 1")
    out = []
    for rec in records:
        text = template.replace("{prompt}", rec["prompt"])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append((text, ids[:max_tokens] if max_tokens else ids))
    return out

"""Prompt files (JSONL, one record per line with a string `prompt` field), prompt templates and chat formatting
(read by the CLI, the server and the evaluation)."""
from __future__ import annotations

import json
import re

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


def fill_template(template: str, prompts: list[str]) -> list[str]:
    """Each prompt put in place of `template`'s {prompt}."""
    if "{prompt}" not in template:
        raise ConfigError("--template must contain {prompt}")
    return [template.replace("{prompt}", p) for p in prompts]


def templated(tokenizer, records: list[dict], template: str, max_tokens: int | None) -> list[tuple[str, list[int]]]:
    """(templated text, its token ids cut to the first `max_tokens`) per record; `template` holds {prompt}."""
    texts = fill_template(template, [rec["prompt"] for rec in records])
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError("--max-prompt-tokens must be >= 1")
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append((text, ids[:max_tokens] if max_tokens else ids))
    return out


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape_template(text: str) -> str:
    """A --template as typed in a shell: the two characters \\n become a newline and \\t a tab (\\\\ is one
    backslash), so 'User: {prompt}\\n\\nAssistant:' in plain quotes means what it says. Real newlines
    (bash's $'...') pass unchanged."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as one user message formatted by the tokenizer's chat template, ending with the assistant's turn
    to speak (`finemoe generate --chat`). ConfigError if the tokenizer has no chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("--chat: the model's tokenizer has no chat template (its chat_template is unset): drop "
                          "--chat, or format the prompts with --template, e.g. 'User: {prompt}\\n\\nAssistant:'")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False) for p in prompts]

"""`finemoe maps build` checkpoints: the map store learned so far, written atomically next to --out (OUT.partial)
after every few batches, with what it was built from and how many prompts it holds; `--resume` continues from it.

The checkpoint is an ordinary map store file whose safetensors metadata also holds `BuildProgress` as JSON under
PROGRESS_KEY. A build resumed from it serves the same batches as an uninterrupted one (checkpoints fall on batch
boundaries), so it ends with the same store.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from safetensors import safe_open

from finemoe.errors import ConfigError

PROGRESS_KEY = "finemoe_maps_build"


def checkpoint_path(out: str) -> str:
    return out + ".partial"


def prompts_digest(prompts: list[list[int]]) -> str:
    """sha256 of the shaped prompts' token ids, in order."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


@dataclass(frozen=True)
class BuildProgress:
    model: str                 # the engine's model name
    max_new_tokens: int
    capacity: int
    policy_options: dict       # --policy-option as given (JSON values)
    done: int                  # the store holds the maps of the first `done` shaped prompts ...
    digest: str                # ... whose token ids hash to this (prompts_digest)

    def metadata(self) -> dict[str, str]:
        return {PROGRESS_KEY: json.dumps(asdict(self))}


def read_progress(path: str) -> BuildProgress:
    """The progress saved in checkpoint `path`; a one-line ConfigError when there is none to resume."""
    if not os.path.isfile(path):
        raise ConfigError(f"--resume: no checkpoint {path!r} to continue: run without --resume to start the build")
    try:
        with safe_open(path, framework="numpy") as f:
            return BuildProgress(**json.loads((f.metadata() or {})[PROGRESS_KEY]))
    except Exception as e:  # safetensors raises several types for a damaged file; a missing key or field
        raise ConfigError(f"--resume: {path!r} is not a readable maps build checkpoint ({type(e).__name__}): pass "
                          "--overwrite to start the build over") from None


def check_resumable(saved: BuildProgress, current: BuildProgress, prompts: list[list[int]], path: str) -> None:
    """`saved` (a checkpoint's) continues the build `current` describes over the shaped `prompts`, else a one-line
    ConfigError naming what differs."""
    differ = [f"{k}: checkpoint {getattr(saved, k)!r}, this command {getattr(current, k)!r}"
              for k in ("model", "max_new_tokens", "capacity", "policy_options")
              if getattr(saved, k) != getattr(current, k)]
    if saved.done > len(prompts) or prompts_digest(prompts[:saved.done]) != saved.digest:
        differ.append(f"prompts: the checkpoint's first {saved.done} shaped prompts are not this command's (check "
                      "--prompts, --template, --max-prompt-tokens and --limit)")
    if differ:
        raise ConfigError(f"checkpoint {path!r} was built by another command ({'; '.join(differ)}): repeat that "
                          "command with --resume, or pass --overwrite to start over")

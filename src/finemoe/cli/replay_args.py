"""Flags shared by the commands that replay a routing trace (`simulate`, `tune`): the engine knobs the simulator
models (prefetch copies in flight, how prefetches are issued) and what a policy reads from the recorded model
(its input embedding, for finemoe's token semantics)."""
from __future__ import annotations

import argparse
import glob
import os

from finemoe.cli.common import add_prefetch_args
from finemoe.errors import ConfigError
from finemoe.experts.prefetch_issue import PrefetchIssue


def add_replay_args(p: argparse.ArgumentParser, issue_help: str) -> None:
    add_prefetch_args(p, issue_help)
    p.add_argument("--embed-from", default=None, metavar="MODEL_DIR",
                   help="the recorded model's folder: its input embedding drives finemoe's token semantics "
                        "(without it, finemoe needs --policy-option finemoe:semantic=prompt)")


def prefetch_issues(args: argparse.Namespace) -> list[PrefetchIssue]:
    """--prefetch-issue (comma-separated modes) and --copy-chunk-bytes -> one rule per mode, validated."""
    if args.prefetch_inflight < 1:
        raise ConfigError("--prefetch-inflight must be >= 1")
    modes = [m.strip() for m in args.prefetch_issue.split(",") if m.strip()]
    if not modes:
        raise ConfigError("--prefetch-issue is empty: use inflight, idle, off or a list such as inflight,idle")
    return [PrefetchIssue(m, args.copy_chunk_bytes) for m in dict.fromkeys(modes)]


def embedding(args: argparse.Namespace):
    """--embed-from's input embedding (torch.nn.Embedding), or None."""
    return input_embedding(args.embed_from) if args.embed_from else None


def input_embedding(folder: str):
    """The model's input-embedding table (torch.nn.Embedding) from its safetensors files."""
    import torch   # not for --help
    from safetensors import safe_open

    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.endswith("embed_tokens.weight"):
                    return torch.nn.Embedding.from_pretrained(f.get_tensor(key).float())
    raise ConfigError(f"--embed-from {folder!r}: no embed_tokens.weight in its *.safetensors files")

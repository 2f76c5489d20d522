"""Flags shared by the commands that replay a routing trace (`simulate`, `tune`): the engine knobs the simulator
models (prefetch copies in flight, how prefetches are issued) and what a policy reads from the recorded model
(its input embedding, for finemoe's token semantics: `semantic_source`)."""
from __future__ import annotations

import argparse
import glob
import os
import sys

from finemoe.cli.common import add_prefetch_args
from finemoe.errors import ConfigError
from finemoe.experts.prefetch_issue import PrefetchIssue


def add_replay_args(p: argparse.ArgumentParser, issue_help: str) -> None:
    add_prefetch_args(p, issue_help)
    p.add_argument("--embed-from", default=None, metavar="MODEL_DIR",
                   help="the recorded model's folder: its input embedding drives finemoe's token semantics "
                        "(default: the rows `finemoe trace` recorded in the trace; a trace without them, such as "
                        "the FLAME trace, runs finemoe's trajectory search only)")


def prefetch_issues(args: argparse.Namespace) -> list[PrefetchIssue]:
    """--prefetch-issue (comma-separated modes) and --copy-chunk-bytes -> one rule per mode, validated."""
    if args.prefetch_inflight < 1:
        raise ConfigError("--prefetch-inflight must be >= 1")
    modes = [m.strip() for m in args.prefetch_issue.split(",") if m.strip()]
    if not modes:
        raise ConfigError("--prefetch-issue is empty: use inflight, idle, off or a list such as inflight,idle")
    return [PrefetchIssue(m, args.copy_chunk_bytes) for m in dict.fromkeys(modes)]


def semantic_source(args: argparse.Namespace, trace, options: dict[str, dict], command: str):
    """The input embedding finemoe's token semantics read (None without one): --embed-from's model if given, else
    the rows the trace recorded. When finemoe is replayed its options are completed and one line on stderr says
    which source it reads; with neither source (and no semantic/search option given) finemoe runs its trajectory
    search only (semantic='none', search='trajectory'). `trace`: the replayed Trace; `options`: policy -> options,
    updated in place."""
    if args.embed_from:
        embed, source = input_embedding(args.embed_from), f"the input embedding of --embed-from {args.embed_from}"
    else:
        embed, source = trace.embedding(), f"the input-embedding rows recorded in {trace.source}"
    opts = options.get("finemoe")
    if opts is None:
        return embed
    if "semantic" in opts:
        note = f"semantic={opts['semantic']!r} as --policy-option sets it"
    elif embed is not None:
        note = f"token semantics from {source}"
    elif opts.get("search", "trajectory") == "trajectory":
        opts.update(semantic="none", search="trajectory")
        note = (f"trajectory search only: {trace.source} holds no input embedding (record traces with `finemoe "
                "trace`, or pass --embed-from MODEL_DIR, for the paper's token semantics)")
    else:
        return embed                  # the policy's own one-line error names the missing embedding
    print(f"finemoe: {command}: finemoe: {note}", file=sys.stderr)
    return embed


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

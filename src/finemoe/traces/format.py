"""The routing trace file format (version 1): one .safetensors file, arrays plus a JSON header.

A trace holds, for R requests run one after another, every token the model routed and, per token
and MoE layer, the top-k expert ids and (optionally) the full router probabilities.

Iterations: request r routes `prompt_lens[r]` tokens in its first iteration (prefill, all in one
forward pass) and then one token per decode iteration, `iterations[r]` iterations in all. So its
routed tokens are `prompt_lens[r] + iterations[r] - 1`, stored contiguously from `offsets[r]`.

Arrays (safetensors):
  offsets     int64 [R+1]      first routed token of each request (offsets[R] = N)
  prompt_lens int32 [R]        tokens routed at prefill
  iterations  int32 [R]        forward passes the request took part in (prefill + decode)
  token_ids   int32 [N]        the routed token ids (prompt, then each fed-back generated token):
                               enough to recompute embeddings for semantic prefetching
  topk        uint8|int16 [N, L, k]  chosen experts per token and layer, router order (highest first)
  probs       float16 [N, L, J]      full router softmax (only when header.has_probs)
  embed_ids   int32 [U]        the distinct routed token ids, sorted (only when header.has_embedding) ...
  embed_rows  float32 [U, H]   ... and the recorded model's input-embedding row of each: what finemoe's token
                               semantics read when the trace is replayed without the model (traces/token_rows.py)
Header (safetensors metadata key "finemoe_trace", JSON): format_version, model, num_layers,
num_experts, top_k, expert_bytes (bytes of one routed expert of the recorded model, or null),
has_probs, probs_note (how probs were obtained), source, request_ids [R], prompt_texts [R] (or nulls),
has_embedding (absent in traces recorded before it: read as false).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from finemoe.errors import TraceError
from finemoe.storage import save_atomic
from finemoe.traces.flame import read_flame
from finemoe.traces.token_rows import TokenRows

FORMAT_VERSION = 1
HEADER_KEY = "finemoe_trace"


@dataclass
class Trace:
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    offsets: np.ndarray
    prompt_lens: np.ndarray
    iterations: np.ndarray
    token_ids: np.ndarray
    topk: np.ndarray
    probs: np.ndarray | None = None
    expert_bytes: int | None = None
    probs_note: str = "router softmax recorded by the engine (fp16)"
    source: str = ""
    request_ids: list[str] = field(default_factory=list)
    prompt_texts: list[str | None] = field(default_factory=list)
    embed_ids: np.ndarray | None = None      # [U] sorted distinct token ids with a recorded input-embedding row
    embed_rows: np.ndarray | None = None     # [U, H] float32 those rows

    def __post_init__(self) -> None:
        R = len(self.prompt_lens)
        if not self.request_ids:
            self.request_ids = [f"r{i}" for i in range(R)]
        if not self.prompt_texts:
            self.prompt_texts = [None] * R
        self.validate()

    # ---- shape facts ---------------------------------------------------------------------------
    @property
    def num_requests(self) -> int:
        return int(self.prompt_lens.size)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def has_probs(self) -> bool:
        return self.probs is not None

    @property
    def has_embedding(self) -> bool:
        return self.embed_rows is not None

    def embedding(self) -> TokenRows | None:
        """The recorded model's input embedding over this trace's token ids, or None when it was not recorded."""
        return TokenRows(self.embed_ids, self.embed_rows) if self.has_embedding else None

    def prompt_ids(self, r: int) -> list[int]:
        a = int(self.offsets[r])
        return self.token_ids[a:a + int(self.prompt_lens[r])].tolist()

    def iteration_rows(self, r: int, i: int) -> tuple[int, int]:
        """Token rows [a, b) routed by request r in its iteration i (0 = prefill)."""
        a, p = int(self.offsets[r]), int(self.prompt_lens[r])
        return (a, a + p) if i == 0 else (a + p + i - 1, a + p + i)

    def head(self, n: int) -> Trace:
        """The first n requests as a trace of their own."""
        n = min(n, self.num_requests)
        end = int(self.offsets[n])
        return Trace(self.model, self.num_layers, self.num_experts, self.top_k, self.offsets[:n + 1].copy(),
                     self.prompt_lens[:n].copy(), self.iterations[:n].copy(), self.token_ids[:end],
                     self.topk[:end], None if self.probs is None else self.probs[:end], self.expert_bytes,
                     self.probs_note, self.source, self.request_ids[:n], self.prompt_texts[:n], self.embed_ids,
                     self.embed_rows)

    def validate(self) -> None:
        R, L, J, k = self.num_requests, self.num_layers, self.num_experts, self.top_k
        N = int(self.offsets[-1]) if self.offsets.size else 0
        problems = []
        if self.offsets.shape != (R + 1,) or self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0):
            problems.append("offsets must be [R+1], start at 0 and not decrease")
        elif np.any(np.diff(self.offsets) != self.prompt_lens.astype(np.int64) + self.iterations - 1):
            problems.append("each request must route prompt_len + iterations - 1 tokens")
        if np.any(self.prompt_lens < 1) or np.any(self.iterations < 1):
            problems.append("prompt_lens and iterations must be >= 1")
        if self.token_ids.shape != (N,):
            problems.append(f"token_ids has shape {self.token_ids.shape}, expected ({N},)")
        if self.topk.shape != (N, L, k):
            problems.append(f"topk has shape {self.topk.shape}, expected ({N}, {L}, {k})")
        elif N and (self.topk.min() < 0 or self.topk.max() >= J):
            problems.append(f"topk holds expert ids outside 0..{J - 1}")
        if self.probs is not None and self.probs.shape != (N, L, J):
            problems.append(f"probs has shape {self.probs.shape}, expected ({N}, {L}, {J})")
        if (self.embed_ids is None) != (self.embed_rows is None):
            problems.append("embed_ids and embed_rows come together")
        elif self.embed_ids is not None and (self.embed_rows.ndim != 2
                                             or self.embed_ids.shape != (self.embed_rows.shape[0],)):
            problems.append(f"embed_ids {self.embed_ids.shape} and embed_rows {self.embed_rows.shape} must be "
                            "[U] and [U, H]")
        elif self.embed_ids is not None and (np.any(np.diff(self.embed_ids) <= 0)
                                             or np.setdiff1d(self.token_ids, self.embed_ids).size):
            problems.append("embed_ids must be sorted, distinct and cover every routed token id")
        if len(self.request_ids) != R or len(self.prompt_texts) != R:
            problems.append("request_ids and prompt_texts need one entry per request")
        if problems:
            raise TraceError(f"inconsistent trace ({self.source or self.model}): " + "; ".join(problems))

    # ---- file I/O ------------------------------------------------------------------------------
    def header(self) -> dict:
        return {"format_version": FORMAT_VERSION, "model": self.model, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "top_k": self.top_k, "expert_bytes": self.expert_bytes,
                "has_probs": self.has_probs, "probs_note": self.probs_note if self.has_probs else None,
                "source": self.source, "request_ids": self.request_ids, "prompt_texts": self.prompt_texts,
                "has_embedding": self.has_embedding}

    def save(self, path: str) -> None:
        """Write atomically (temp file + rename): a crash never leaves a half-written trace."""
        id_dtype = np.uint8 if self.num_experts <= 256 else np.int16
        arrays = {"offsets": self.offsets.astype(np.int64), "prompt_lens": self.prompt_lens.astype(np.int32),
                  "iterations": self.iterations.astype(np.int32), "token_ids": self.token_ids.astype(np.int32),
                  "topk": np.ascontiguousarray(self.topk.astype(id_dtype))}
        if self.probs is not None:
            arrays["probs"] = np.ascontiguousarray(self.probs.astype(np.float16))
        if self.embed_rows is not None:
            arrays["embed_ids"] = self.embed_ids.astype(np.int32)
            arrays["embed_rows"] = np.ascontiguousarray(self.embed_rows.astype(np.float32))
        save_atomic(lambda tmp: save_file(arrays, tmp, metadata={HEADER_KEY: json.dumps(self.header())}), path)


def load_trace(path: str) -> Trace:
    """Read a trace: a finemoe .safetensors trace, or the FLAME-MoE .npz (through its adapter)."""
    if str(path).partition("#")[0].endswith(".npz"):
        return Trace(**read_flame(path))
    if os.path.isdir(path):
        raise TraceError(f"trace {path!r} is a directory: give the trace's file path")
    if not os.path.isfile(path):
        raise TraceError(f"trace file {path!r} does not exist: record one with `finemoe trace --out {path}`")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
        arrays = load_file(path)
    except Exception as e:  # safetensors raises several types for a damaged file
        raise TraceError(f"cannot read trace {path!r}: {e}") from None
    if HEADER_KEY not in meta:
        raise TraceError(f"{path!r} is a safetensors file but not a finemoe trace (no {HEADER_KEY!r} header)")
    h = json.loads(meta[HEADER_KEY])
    if h.get("format_version") != FORMAT_VERSION:
        raise TraceError(f"trace {path!r} has format version {h.get('format_version')}; this finemoe reads "
                         f"version {FORMAT_VERSION}: re-record it with `finemoe trace`")
    return Trace(model=h["model"], num_layers=h["num_layers"], num_experts=h["num_experts"], top_k=h["top_k"],
                 offsets=arrays["offsets"], prompt_lens=arrays["prompt_lens"], iterations=arrays["iterations"],
                 token_ids=arrays["token_ids"], topk=arrays["topk"], probs=arrays.get("probs"),
                 expert_bytes=h.get("expert_bytes"), probs_note=h.get("probs_note") or "", source=str(path),
                 request_ids=list(h["request_ids"]), prompt_texts=list(h["prompt_texts"]),
                 embed_ids=arrays.get("embed_ids"), embed_rows=arrays.get("embed_rows"))

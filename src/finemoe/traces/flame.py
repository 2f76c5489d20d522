"""Adapter: the real FLAME-MoE-290M routing trace (../shared/data/traces/flame_moe_290m.npz) as a Trace.

The file holds top-6 expert ids and their router scores for 8 MoE layers (64 experts), teacher-forced:
  seq_*      4 sequences x 512 tokens
  first10_*  the first 10 tokens of 64 sequences (sequences 0-3 are the 4 full ones)
What the adapter makes of it (documented in docs/POLICIES.md, "Traces"):
  - one request per sequence; the first `prefill_tokens` tokens form the prefill iteration and every
    later token is one decode iteration, so token-to-token locality is what the cache sees;
  - probs [N, 8, 64] are the top-6 scores scattered into zeros (the file has no full probabilities:
    the other 58 entries are unknown, the top-6 sum to about 0.43);
  - expert_bytes is unknown (None): pass --expert-bytes to cost it.
Parts: "seq" (4 requests x 512 tokens), "first10" (64 x 10), "all" (the 4 full sequences, then
first10 of sequences 4-63). Select one with a suffix: flame_moe_290m.npz#first10.
"""
from __future__ import annotations

import os

import numpy as np

from finemoe.errors import TraceError

PARTS = ("seq", "first10", "all")
NUM_EXPERTS = 64


def _scatter_probs(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ids/scores [N, L, k] -> probs [N, L, J] float16 with the top-k scores in place, zeros elsewhere."""
    N, L, _ = ids.shape
    probs = np.zeros((N, L, NUM_EXPERTS), np.float16)
    np.put_along_axis(probs, ids.astype(np.int64), scores.astype(np.float16), axis=-1)
    return probs


def _part(data, prefix: str, seqs: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens [S, T], ids [S*T, L, k], scores [S*T, L, k] for the chosen sequences (token-major)."""
    tokens = data[f"{prefix}_tokens"][seqs]
    S, T = tokens.shape
    ids = data[f"{prefix}_topk_ids"][:, seqs]            # [L, S, T, k]
    scores = data[f"{prefix}_topk_scores"][:, seqs]
    L, k = ids.shape[0], ids.shape[-1]

    def to_rows(a: np.ndarray) -> np.ndarray:   # [L, S, T, k] -> [S*T, L, k]
        return np.ascontiguousarray(a.transpose(1, 2, 0, 3).reshape(S * T, L, k))
    return tokens, to_rows(ids), to_rows(scores)


def read_flame(path: str, prefill_tokens: int = 1) -> dict:
    """The FLAME trace `path` (optionally `#part`) as the keyword arguments of a `Trace`."""
    file, _, part = str(path).partition("#")
    part = part or "seq"
    if part not in PARTS:
        raise TraceError(f"FLAME trace part {part!r} is unknown: use {file}#" + f", {file}#".join(PARTS))
    if not os.path.isfile(file):
        raise TraceError(f"FLAME trace {file!r} does not exist (expected ../shared/data/traces/flame_moe_290m.npz)")
    try:
        data = np.load(file)
        pieces = {"seq": [("seq", slice(0, 4))], "first10": [("first10", slice(0, 64))],
                  "all": [("seq", slice(0, 4)), ("first10", slice(4, 64))]}[part]
        parts = [_part(data, prefix, seqs) for prefix, seqs in pieces]
    except (KeyError, ValueError, OSError) as e:
        raise TraceError(f"{file!r} is not the FLAME-MoE trace npz: {e}") from None
    lengths = np.concatenate([np.full(t.shape[0], t.shape[1], np.int64) for t, _, _ in parts])
    if prefill_tokens < 1 or prefill_tokens > lengths.min():
        raise TraceError(f"prefill_tokens must be in 1..{lengths.min()}, got {prefill_tokens}")
    tokens = np.concatenate([t.reshape(-1) for t, _, _ in parts]).astype(np.int32)
    ids = np.concatenate([i for _, i, _ in parts])
    scores = np.concatenate([s for _, _, s in parts])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    prompt_lens = np.full(lengths.size, prefill_tokens, np.int32)
    names = [f"flame-{prefix}-{s}" for prefix, seqs in pieces for s in range(seqs.start, seqs.stop)]
    return dict(model="FLAME-MoE-290M", num_layers=ids.shape[1], num_experts=NUM_EXPERTS, top_k=ids.shape[2],
                offsets=offsets, prompt_lens=prompt_lens, iterations=(lengths - prefill_tokens + 1).astype(np.int32),
                token_ids=tokens, topk=ids.astype(np.uint8), probs=_scatter_probs(ids, scores), expert_bytes=None,
                probs_note="top-6 router scores scattered into zeros (FLAME trace has no full probabilities)",
                source=str(path), request_ids=names)

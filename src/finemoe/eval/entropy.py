"""Experiment 1 (the paper's Fig. 3): how predictable expert usage is at request vs iteration granularity.

For a unit of work (a whole request, or one iteration of it) and an MoE layer, the unit's expert usage is
the normalised sum of its tokens' router distributions over the J experts; its entropy (bits) says how
concentrated that usage is: 0 = one expert, log2(J) = uniform. A request aggregates all its iterations, so
its usage is at least as spread as the average iteration's (concavity of entropy); the size of the gap is
what makes fine-grained (iteration-level) prediction worth it.
"""
from __future__ import annotations

import numpy as np

from finemoe.errors import ConfigError
from finemoe.traces.format import Trace


def entropy_bits(weights: np.ndarray) -> np.ndarray:
    """weights [..., J] (non-negative, not necessarily normalised) -> entropy in bits [...]. All-zero rows -> 0."""
    w = np.asarray(weights, np.float64)
    total = w.sum(-1, keepdims=True)
    p = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    logp = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logp).sum(-1)


def iteration_starts(trace: Trace) -> np.ndarray:
    """First token row of every iteration of every request, in order -> [I]. Iteration 0 is the prefill
    (prompt_lens[r] rows), each later iteration one row."""
    starts = []
    for r in range(trace.num_requests):
        a, p, n = int(trace.offsets[r]), int(trace.prompt_lens[r]), int(trace.iterations[r])
        starts.append(np.concatenate([[a], a + p + np.arange(n - 1)]))
    return np.concatenate(starts).astype(np.int64)


WEIGHTS = ("topk", "probs")


def token_distributions(trace: Trace, weights: str = "topk") -> np.ndarray:
    """[N, L, J] float32 per token and layer, summing to 1. weights="topk": the k chosen experts, 1/k each
    (comparable across every trace); "probs": the router distribution (FLAME's file holds only top-6
    scores, renormalised over those; a trace without probabilities falls back to top-k)."""
    if weights not in WEIGHTS:
        raise ConfigError(f"entropy weights {weights!r} unknown; use one of {', '.join(WEIGHTS)}")
    if weights == "probs" and trace.probs is not None:
        w = trace.probs.astype(np.float32)
    else:
        w = np.zeros((trace.num_tokens, trace.num_layers, trace.num_experts), np.float32)
        np.put_along_axis(w, trace.topk.astype(np.int64), 1.0, axis=-1)
    s = w.sum(-1, keepdims=True)
    return np.divide(w, s, out=np.zeros_like(w), where=s > 0)


def usage_entropy(trace: Trace, weights: str = "topk") -> dict:
    """Per layer: mean entropy (bits) of request-level and of iteration-level expert usage, and the
    uniform maximum log2(J). Lists have one entry per MoE layer."""
    if trace.num_tokens == 0:
        raise ConfigError("the trace routes no tokens")
    dist = token_distributions(trace, weights)                                        # [N, L, J]
    per_request = np.add.reduceat(dist, trace.offsets[:-1].astype(np.int64), axis=0)   # [R, L, J]
    per_iteration = np.add.reduceat(dist, iteration_starts(trace), axis=0)              # [I, L, J]
    req = entropy_bits(per_request).mean(0)                                   # [L]
    it = entropy_bits(per_iteration).mean(0)                                  # [L]
    return {"request_bits": req.tolist(), "iteration_bits": it.tolist(), "max_bits": float(np.log2(trace.num_experts)),
            "requests": trace.num_requests, "iterations": int(trace.iterations.sum()), "tokens": trace.num_tokens,
            "layers": trace.num_layers, "experts": trace.num_experts, "top_k": trace.top_k, "weights": weights}

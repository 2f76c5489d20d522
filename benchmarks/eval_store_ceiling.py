"""Why FineMoE stays below the oracle: how well can *any* lookup in a map store built from the build split
predict a held-out iteration's experts? (docs/RESULTS.md, "Against the paper's claims".)

For every held-out decode iteration (one token), per layer, the recall of its actual top-k experts by:
  nearest map    the top-k of the stored map most cosine-similar to the iteration's own *complete* map
                 (a clairvoyant lookup: the best any map store search could return)
  prefix map     the stored map most similar over layers 0..l-1, predicting layer l (trajectory search, d=1)
  previous token the top-k the same request used at the previous iteration in that layer (temporal locality)
  same-layer top the k most used experts of that layer over the build split (a static popularity guess)

    python3 benchmarks/eval_store_ceiling.py --build BUILD_TRACE --held HELD_TRACE
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from finemoe.eval.entropy import iteration_starts
from finemoe.traces import load_trace


def decode_maps(trace):
    """Probs [n_iter, L, J] and top-k [n_iter, L, k] of every decode iteration (prefill dropped), plus the request
    of each."""
    starts = iteration_starts(trace)
    first = trace.offsets[:-1]
    dec = np.setdiff1d(starts, first)
    req = np.searchsorted(trace.offsets, dec, side="right") - 1
    return trace.probs[dec].astype(np.float32), trace.topk[dec].astype(np.int64), req


def recall(pred: np.ndarray, actual: np.ndarray) -> float:
    """pred, actual [n_iter, L, k] expert ids -> mean fraction of actual experts found in pred."""
    hit = (pred[..., :, None] == actual[..., None, :]).any(-2)        # [n_iter, L, k]
    return float(hit.mean())


def topk_of(maps: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-maps, axis=-1)[..., :k]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", required=True)
    p.add_argument("--held", required=True)
    args = p.parse_args(argv)
    b, h = load_trace(args.build), load_trace(args.held)
    bp, _, _ = decode_maps(b)
    hp, hk, hreq = decode_maps(h)
    n_iter, L, J = hp.shape
    k = h.top_k
    flat_b = bp.reshape(len(bp), -1)
    flat_b = flat_b / np.linalg.norm(flat_b, axis=1, keepdims=True)
    flat_h = hp.reshape(n_iter, -1)
    nearest = np.argmax(flat_h @ flat_b.T, axis=1)                    # [n_iter]
    out = {"nearest map (clairvoyant lookup)": recall(topk_of(bp[nearest], k), hk)}
    pred = np.empty_like(hk)
    pred[:, 0] = topk_of(bp[np.argmax(hp[:, 0] @ bp[:, 0].T, axis=1), 0], k)   # layer 0: its own (clairvoyant)
    dots = np.zeros((n_iter, len(bp)), np.float32)
    sq_b = np.zeros(len(bp), np.float32)
    for layer in range(1, L):
        dots += hp[:, layer - 1] @ bp[:, layer - 1].T
        sq_b += (bp[:, layer - 1] ** 2).sum(1)
        best = np.argmax(dots / np.sqrt(sq_b)[None, :], axis=1)
        pred[:, layer] = topk_of(bp[best, layer], k)
    out["prefix map (trajectory, d=1)"] = recall(pred[:, 1:], hk[:, 1:])
    same = np.r_[False, hreq[1:] == hreq[:-1]]
    out["previous token, same request"] = recall(hk[np.flatnonzero(same) - 1], hk[same])
    pop = topk_of(bp.sum(0), k)                                        # [L, k]
    out["build-split popularity"] = recall(np.broadcast_to(pop, hk.shape), hk)
    out["random guess (k/J)"] = k / J
    for name, v in out.items():
        print(f"{name:36s} {v:.3f}")
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

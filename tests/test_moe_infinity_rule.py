"""moe-infinity's prefetches are exactly those of its defining rule, written out here (the policy keeps running
match scores and decides near ties by the defining products, matching.py): match = argmax of the float64 product
of the requests' activation matrices with the stored (float32) unit rows (a fresh request takes the stored mean),
prefetch = the match's top experts by per-layer usage share in the next layers, priority = share / distance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finemoe.models.adapters import ExpertGeometry
from finemoe.policies import create_policy
from finemoe.policies.base import CacheView, IterationInfo, LayerRouting, PolicyContext, RequestInfo

L, J, K = 4, 8, 2


def plain_prefetch(units: np.ndarray, eams: np.ndarray, layer: int, distance: int, n: int):
    """units [C, L*J] stored unit rows, eams [B, L*J] -> (keys, priority) by the plain rule."""
    first, end = layer + 1, min(layer + 1 + distance, L)
    if end <= first or eams.shape[0] == 0 or units.shape[0] == 0:
        return np.empty(0, np.int64), np.empty(0)
    matched = units[np.argmax(eams.astype(np.float64) @ units.T.astype(np.float64), axis=1)]   # [B, L*J]
    fresh = ~eams.any(axis=1)
    matched[fresh] = units.mean(axis=0)
    use = matched.reshape(-1, L, J)[:, first:end]                          # [B, D, J]
    share = (use / np.maximum(use.sum(axis=2, keepdims=True), 1e-12)).max(axis=0)   # [D, J]
    top = (-share).argsort(axis=1, kind="stable")[:, :n]                   # [D, n]
    score = np.take_along_axis(share, top, axis=1)
    targets = np.arange(first, end)[:, None]
    keep = score > 0
    return (targets * J + top)[keep], (score / (targets - layer).astype(np.float64))[keep]


class PlainModel:
    """The test's own bookkeeping: per-request matrices and the ring of stored unit rows."""

    def __init__(self, capacity: int) -> None:
        self.units = np.zeros((capacity, L * J), np.float32)
        self.size = self.next = 0
        self.eams: dict[str, np.ndarray] = {}

    def end(self, rid: str) -> None:
        eam = self.eams.pop(rid)
        norm = float(np.linalg.norm(eam))
        if norm:
            self.units[self.next] = eam / norm
            self.next = (self.next + 1) % len(self.units)
            self.size = min(self.size + 1, len(self.units))


def drive(policy, plain: PlainModel, rng, rounds: int, batch: int, repeats: dict[str, np.ndarray]) -> int:
    """Random requests (siblings of running ones; exact replays of earlier ones: exact ties) join between
    iterations, prefill with padding, then decode; some sit an iteration out, and finish meanwhile or after
    their iteration. Compares every prefetch with the plain rule's; returns how many."""
    live: dict[str, list] = {}
    compared = 0

    def check(prefetch, rows, layer):
        nonlocal compared
        eams = np.stack([plain.eams[r] for r in rows])
        keys, priority = plain_prefetch(plain.units[:plain.size], eams, layer, policy.distance, policy.per_layer)
        assert prefetch.keys.tolist() == keys.tolist()
        assert prefetch.priority.tobytes() == priority.tobytes()
        compared += 1

    def finish(r):
        del live[r]
        policy.on_request_end(RequestInfo(r, [1]))
        plain.end(r)

    for step in range(rounds):
        while len(live) < batch:
            rid = f"r{step}-{len(live)}"
            taste = rng.dirichlet(np.full(J, 0.5))                        # each request favours its own experts
            if live and rng.random() < 0.4:      # a running request's sibling: its match changes when that one ends
                taste = live[rng.choice(list(live))][2]
            routing = rng.choice(J, size=(int(rng.integers(2, 10)), L, K), p=taste)
            if repeats and rng.random() < 0.2:   # an exact replay: exact ties in the collection
                routing = repeats[rng.choice(list(repeats))]
            repeats.setdefault(rid, routing)
            live[rid] = [routing, 0, taste]
            policy.on_request_start(RequestInfo(rid, [1]))
            plain.eams[rid] = np.zeros(L * J, np.float32)
        rows = [r for r in live if rng.random() < 0.8] or list(live)[:1]   # the rest sit this iteration out
        out = [r for r in live if r not in rows]
        prefill = [r for r in rows if live[r][1] == 0]
        width = 3 if prefill else 1                                       # tokens per row this iteration
        token_rows, topk = [], []
        for b, r in enumerate(rows):
            routing, pos, _ = live[r]
            n = min(width, len(routing) - pos) if r in prefill else 1
            token_rows += [b] * n + [-1] * (width - n)                     # left-over width is padding
            topk += [routing[pos + i] for i in range(n)] + [routing[0]] * (width - n)
            live[r][1] += n
        token_rows, topk = np.array(token_rows), np.array(topk)           # [T], [T, L, K]
        it = IterationInfo(step, rows, [0] * len(rows), torch.zeros(len(rows), width, dtype=torch.long), bool(prefill))
        check(policy.on_iteration_start(it), rows, -1)
        for layer in range(L):
            experts, counts = np.unique(topk[:, layer], return_counts=True)   # the engine counts padding too
            policy.on_access(layer, experts, counts)
            for t in np.nonzero(token_rows >= 0)[0]:
                np.add.at(plain.eams[rows[token_rows[t]]], layer * J + topk[t, layer], 1)
            check(policy.on_layer_routed(LayerRouting(layer, torch.from_numpy(topk[:, layer]), token_rows)),
                  rows, layer)
            if layer == 1 and out and rng.random() < 0.3:                  # one sitting out ends meanwhile
                finish(out.pop())
        policy.on_iteration_end(it)
        for r in rows:
            if live[r][1] >= len(live[r][0]) or rng.random() < 0.1:
                finish(r)
    return compared



def bound(**options):
    p = create_policy("moe-infinity", **options)
    p.bind(PolicyContext(ExpertGeometry(L, J, K, 1, {}, torch.float32), CacheView(np.zeros(L * J, bool), 4),
                         torch.device("cpu")))
    return p


@pytest.mark.parametrize("batch,capacity,distance,per_layer", [(1, 1000, 2, None), (1, 6, 3, 3), (3, 1000, 2, 1),
                                                              (2, 5, 1, None)])
def test_prefetches_equal_the_plain_rule_bit_for_bit(batch, capacity, distance, per_layer):
    rng = np.random.default_rng(batch * 100 + capacity)
    policy = bound(capacity=capacity, prefetch_distance=distance, per_layer=per_layer)
    assert drive(policy, PlainModel(capacity), rng, rounds=150, batch=batch, repeats={}) > 500


def test_a_loaded_collection_matches_like_the_one_it_was_saved_from(tmp_path):
    rng = np.random.default_rng(7)
    path = str(tmp_path / "eam.safetensors")
    first, plain, repeats = bound(collection=path, capacity=8), PlainModel(8), {}
    drive(first, plain, rng, rounds=60, batch=1, repeats=repeats)
    first.close()
    again = bound(collection=path, capacity=8)
    np.testing.assert_array_equal(again.collection.unit[:again.collection.size], plain.units[:plain.size])
    plain.eams.clear()
    assert drive(again, plain, rng, rounds=60, batch=2, repeats=repeats) > 100

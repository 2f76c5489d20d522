"""Eviction ranks (Policy.eviction_rank: live arrays the compiled cache reads) are a pure speed-up: with them the
simulator and the cache give exactly the results the plain `select_victims` path gives, row for row, and the
original code's numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import require_shared
from finemoe.policies import get_policy_class
from finemoe.policies.base import EvictionRank
from finemoe.simulator import CostModel, Replay
from finemoe.traces import Trace, load_trace

TIMING_KEYS = {"wall_s", "requests_per_s"}


def skewed_trace(seed: int = 0, R: int = 10, L: int = 4, J: int = 16, k: int = 2, P: int = 5, iters: int = 12) -> Trace:
    """R requests of a P-token prompt and `iters` iterations, top-k over skewed per-layer popularity."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(J, 0.3), size=L)
    N = R * (P + iters - 1)
    topk = np.stack([np.stack([rng.choice(J, k, replace=False, p=pop[layer]) for layer in range(L)]) for _ in range(N)])
    return Trace("synthetic", L, J, k, offsets=np.arange(R + 1) * (P + iters - 1), prompt_lens=np.full(R, P),
                 iterations=np.full(R, iters), token_ids=rng.integers(0, 50, N), topk=topk)


def skewed_trace_with_probs(seed: int = 0, R: int = 10, L: int = 4, J: int = 16, k: int = 2, P: int = 5,
                            iters: int = 12) -> Trace:
    """Like `skewed_trace`, with full router probabilities (finemoe needs them): top-k of noisy popularity."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(J, 0.3), size=L)                                     # [L, J]
    N = R * (P + iters - 1)
    probs = np.exp(np.log(pop + 1e-3)[None] + rng.gumbel(size=(N, L, J)))           # [N, L, J]
    probs /= probs.sum(-1, keepdims=True)
    return Trace("synthetic", L, J, k, offsets=np.arange(R + 1) * (P + iters - 1), prompt_lens=np.full(R, P),
                 iterations=np.full(R, iters), token_ids=rng.integers(0, 50, N),
                 topk=np.argsort(-probs, axis=-1, kind="stable")[..., :k], probs=probs.astype(np.float16))


def without_order(name: str, **options):
    """The same policy with the fast path switched off: the cache asks `select_victims` on every eviction."""
    cls = get_policy_class(name)
    return type(cls.__name__ + "WithoutRank", (cls,), {"eviction_rank": lambda self: None})(**options)


def both_ways(trace: Trace, name: str, options: dict, budget, cost: CostModel, inflight: int) -> tuple[dict, dict]:
    opts = dict(options, trace=trace) if name == "oracle" else dict(options)
    fast = Replay(trace, name, budget, cost, dict(options), inflight)
    fast_row = fast.run()
    assert isinstance(fast.cache._rank, EvictionRank) and fast.cache._rank.control[1] == 1.0   # fast path ran
    plain_row = Replay(trace, without_order(name, **opts), budget, cost, {}, inflight).run()
    def strip(row):
        return {k: v for k, v in row.items() if k not in TIMING_KEYS}
    return strip(fast_row), strip(plain_row)


POLICIES = [("lru", {}), ("lfu", {}), ("deepspeed", {}), ("moe-infinity", {}), ("oracle", {}),
            ("oracle", {"prefetch": False}), ("oracle", {"lookahead": 1})]


@pytest.mark.parametrize("name,options", POLICIES)
@pytest.mark.parametrize("budget", [3, "25%"])
@pytest.mark.parametrize("bandwidth,inflight", [(float("inf"), 4), (40.0, 1), (100.0, 4)])
def test_eviction_ranks_give_the_select_victims_results_on_a_synthetic_trace(name, options, budget, bandwidth,
                                                                            inflight):
    """3 slots: prefill layers need more experts than fit (waves); finite bandwidth: prefetches in flight."""
    budget = budget if isinstance(budget, str) else f"{budget * 10}B"
    fast, plain = both_ways(skewed_trace(), name, options, budget, CostModel(10, bandwidth, 0.05), inflight)
    assert fast == plain
    assert fast["misses"] > 0 and (fast["hits"] > 0 or budget == "30B")


@pytest.mark.parametrize("name,options", POLICIES[:5])
def test_eviction_ranks_give_the_select_victims_results_on_flame_routing(name, options):
    trace = load_trace(str(require_shared("data", "traces", "flame_moe_290m.npz")) + "#first10").head(6)
    fast, plain = both_ways(trace, name, options, "25%", CostModel(17301504, 25e9, 0.3e-3), 4)
    assert fast == plain


def strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


@pytest.mark.parametrize("options", [{}, {"eviction": "ema+p", "max_prefetch": 1}, {"eviction": "lru"},
                                     {"eviction": "lfu"}, {"eviction": "ema"}])
def test_finemoe_eviction_rank_gives_its_select_victims_results(options):
    """finemoe keeps its eviction score (p*freq, freq, ema, ema+p, recency) as a live rank; the cache's compiled
    scan over it picks the victims `select_victims` picks, so the whole replay is the same row for row."""
    trace, cost = skewed_trace_with_probs(), CostModel(10, 40.0, 0.05)
    opts = dict(options, fresh=True, embed=torch.nn.Embedding(50, 8))
    fast = Replay(trace, "finemoe", "60B", cost, dict(opts))
    fast_row = fast.run()
    assert fast.cache._rank is fast.policy.scores.rank                       # the rank path really ran
    plain_row = Replay(trace, without_order("finemoe", **opts), "60B", cost, {}).run()
    assert strip(fast_row) == strip(plain_row)
    assert fast_row["prefetch_copies"] > 0 and fast_row["hits"] > 0


# What the simulator gave before eviction ranks, compiled placement and the other speed-ups (same trace, budget
# and cost model):
# FLAME #seq (4 x 512 tokens, 8 layers, 64 experts, top-6), 25% = 128 slots, 25 GB/s, 0.3 ms per layer.
# The prefetching policies (oracle, moe-infinity) were re-pinned after two deliberate changes: a copy into a
# slot waits for the compute that last read it (as on the GPU), and a prefetch never evicts the experts of
# the layer computing now (ExpertCache.release).
BEFORE = {
    "lru": (21555, 76749, 1327873130496, 0.027660195839960267, 0.028304177456571357),
    "lfu": (28370, 69934, 1209963380736, 0.025584015359995327, 0.026069540932103355),
    "deepspeed": (18670, 79634, 1377787969536, 0.029736376319990043, 0.029355810948217806),
    "oracle": (56616, 41688, 723099058176, 0.018293564159985287, 0.014470506412812605),
    "moe-infinity": (28400, 69904, 1394449317888, 0.02967843647997892, 0.027636149380468985),
}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_flame_results_are_pinned(name):
    trace = load_trace(str(require_shared("data", "traces", "flame_moe_290m.npz")) + "#seq")
    row = Replay(trace, name, "25%", CostModel(17301504, 25e9, 0.3e-3)).run()
    assert (row["hits"], row["misses"], row["bytes_copied"], row["ttft_s"], row["tpot_s"]) == BEFORE[name]

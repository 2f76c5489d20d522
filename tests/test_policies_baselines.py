"""Baseline policies (lfu, deepspeed, moe-infinity, mixtral-offloading, promoe) and the oracle: hand-made
cases with known answers, the oracle as a byte bound, and exact greedy tokens in the engine with each."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import require_shared
from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.errors import ConfigError
from finemoe.models.adapters import ExpertGeometry, find_moe_layers
from finemoe.models.default import build_default_model
from finemoe.policies import create_policy
from finemoe.policies.base import CacheView, IterationInfo, LayerRouting, PolicyContext, RequestInfo
from finemoe.simulator import CostModel, simulate
from finemoe.traces import Trace, load_trace
from helpers import reference_greedy, victims


def bound(name: str, L: int = 2, J: int = 4, k: int = 1, route=None, **options):
    policy = create_policy(name, **options)
    g = ExpertGeometry(L, J, k, 1, {}, torch.float32)
    policy.bind(PolicyContext(g, CacheView(np.zeros(L * J, bool), 4), torch.device("cpu"), route=route))
    return policy


def arr(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def one_layer_trace(experts: list[int], J: int = 4) -> Trace:
    """One request, one MoE layer, top-1: iteration i routes one token to experts[i]."""
    n = len(experts)
    return Trace("hand", 1, J, 1, offsets=arr(0, n), prompt_lens=arr(1), iterations=arr(n),
                 token_ids=np.arange(n), topk=np.array(experts).reshape(n, 1, 1))


# ---- eviction orders ---------------------------------------------------------------------------------
def test_lfu_evicts_the_least_used_then_the_least_recent():
    p = bound("lfu")
    p.on_access(0, arr(0, 1), arr(1, 1))
    p.on_access(0, arr(1, 2), arr(1, 1))
    p.on_access(0, arr(2), arr(1))
    assert victims(p.eviction_rank(), [2, 1, 0], 2) == [0, 1]  # 0 used once; 1 and 2 twice, 1 older


def test_deepspeed_evicts_from_the_least_recently_used_layer_whatever_the_expert():
    p = bound("deepspeed")
    p.on_access(1, arr(0, 1, 2, 3), arr(5, 5, 5, 5))                    # layer 1 busy but older
    p.on_access(0, arr(3), arr(1))
    assert victims(p.eviction_rank(), [3, 7, 4, 5], 3) == [4, 5, 7]


def test_oracle_evicts_the_expert_used_farthest_in_the_future():
    # expert sequence 0 1 2 0 3 0 1 with 2 slots: at step 2 Belady keeps 0 (needed at step 3), evicts 1
    # (next uses after step 2: 0 at 3, 3 at 4, 1 at 6, 2 never)
    p = bound("oracle", L=1, trace=one_layer_trace([0, 1, 2, 0, 3, 0, 1]), prefetch=False)
    p.on_request_start(RequestInfo("a", [0]))
    for step, expert in enumerate([0, 1, 2]):
        p.on_iteration_start(IterationInfo(step, ["a"], [step], torch.zeros(1, 1), step == 0))
        p.on_access(0, arr(expert), arr(1))
    assert victims(p.eviction_rank(), [0, 1, 2, 3], 3) == [2, 1, 3]


def test_oracle_batch_prefetches_the_union_of_its_on_trace_rows_needs():
    # two requests of one prompt token, two layers, top-1: a routes 0 then 1, b routes 2 then 1 (key 5 both)
    trace = Trace("hand", 2, 4, 1, offsets=arr(0, 1, 2), prompt_lens=arr(1, 1), iterations=arr(1, 1),
                  token_ids=arr(7, 8), topk=np.array([[[0], [1]], [[2], [1]]]))
    p = bound("oracle", trace=trace)
    for rid, prompt in (("a", [7]), ("b", [8])):
        p.on_request_start(RequestInfo(rid, prompt))
    pf = p.on_iteration_start(IterationInfo(0, ["a", "b", "a"], [0, 0, 5], torch.zeros(3, 1), True))  # row 2 off
    assert pf.keys.tolist() == [0, 2, 5] and pf.priority.tolist() == [-1.0, -1.0, -2.0]
    p.on_access(0, arr(0, 2), arr(1, 1))
    assert p.on_layer_routed(LayerRouting(0, arr(0, 2)[:, None], arr(0, 1))).keys.tolist() == [5]
    assert victims(p.eviction_rank(), [0, 5, 2], 3) == [0, 2, 5]  # 0 and 2 never again, 5 next
    assert victims(p.eviction_rank(), [0, 5, 2], 3, for_prefetch=True) == [0, 2]  # 5 is needed within the horizon


def test_belady_and_lru_miss_counts_on_a_hand_made_trace():
    trace = one_layer_trace([0, 1, 2, 0, 3, 0, 1])
    cost = CostModel(expert_bytes=1, bandwidth_Bps=float("inf"))
    rows = simulate(trace, ["oracle", "lru", "lfu"], [2], cost, {"oracle": {"prefetch": False}})
    # Belady: miss 0 1 2 (evict 1) hit 0, miss 3 (evict 2), hit 0, miss 1 -> 5 misses
    # LRU:    miss 0 1 2 (evict 0) miss 0 (evict 1) miss 3 (evict 2) hit 0, miss 1 -> 6 misses
    # LFU:    like Belady here: at step 2 both have one use, 0 is older -> evict 0 ... 6 misses
    assert [(r["hits"], r["misses"]) for r in rows] == [(2, 5), (1, 6), (1, 6)]


# ---- moe-infinity -------------------------------------------------------------------------------------
def run_request(p, rid: str, experts_per_layer: list[int]) -> None:
    req = RequestInfo(rid, [1, 2])
    p.on_request_start(req)
    it = IterationInfo(0, [rid], [0], torch.tensor([[1, 2]]), True)
    p.on_iteration_start(it)
    for layer, e in enumerate(experts_per_layer):
        p.on_access(layer, arr(e), arr(1))
        p.on_layer_routed(LayerRouting(layer, torch.tensor([[e]]), arr(0)))
    p.on_iteration_end(it)
    p.on_request_end(req)


def test_moe_infinity_prefetches_the_matched_requests_experts_with_decaying_priority():
    p = bound("moe-infinity", L=3, J=4, k=1, prefetch_distance=2)
    run_request(p, "past-a", [1, 2, 3])
    run_request(p, "past-b", [0, 0, 0])
    p.on_request_start(RequestInfo("new", [5]))
    p.on_iteration_start(IterationInfo(1, ["new"], [0], torch.tensor([[5]]), True))
    p.on_access(0, arr(1), arr(1))
    pf = p.on_layer_routed(LayerRouting(0, torch.tensor([[1]]), arr(0)))   # layer 0 used expert 1: like past-a
    assert pf.keys.tolist() == [1 * 4 + 2, 2 * 4 + 3]
    np.testing.assert_allclose(pf.priority, [1.0, 0.5])


def test_moe_infinity_match_on_a_near_tie_is_the_exact_product_then_the_lowest_row():
    """Rows whose running products are within the collection's tolerance are decided by the defining product
    (float64 terms, key order); equal rows by the lower index. One request and a batch decide alike."""
    from finemoe.policies.moe_infinity import ActivationCollection
    c = ActivationCollection(2, 3, capacity=4)
    base = np.array([3, 1, 0, 2, 0, 1], np.float32)
    c.add(base)                                  # row 0
    c.add(base * 1.0000001)                      # row 1: the same unit row up to float32 rounding
    close = base.copy()
    close[0] += 2e-6                             # row 2: a hair closer to an eam that favours expert 0
    c.add(close)
    c.add(base)                                  # row 3: equal to row 0
    eam = np.array([[3, 1, 0, 2, 0, 1], [5, 0, 0, 0, 0, 0]], np.float32)   # [B, L*J]
    exact = eam.astype(np.float64) @ c.unit.T.astype(np.float64)              # [B, C]
    want = [int(np.flatnonzero(row == row.max())[0]) for row in exact]
    dots = eam.astype(np.float64) @ c.by_key                                  # the running products
    assert np.ptp(dots[1]) / dots[1].max() < c.tol                            # a near tie: all 4 rows
    assert c.best(eam, dots, np.zeros(2, bool)).tolist() == want
    assert [c.best(eam[b:b + 1], dots[b:b + 1], np.zeros(1, bool))[0] for b in range(2)] == want
    assert want[1] == 2


def test_moe_infinity_collection_is_saved_atomically_and_checked_on_load(tmp_path):
    path = tmp_path / "eam.safetensors"
    p = bound("moe-infinity", L=3, J=4, collection=str(path))
    run_request(p, "a", [1, 2, 3])
    p.close()
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    assert bound("moe-infinity", L=3, J=4, collection=str(path)).collection.size == 1
    with pytest.raises(ConfigError, match="collection"):
        bound("moe-infinity", L=2, J=4, collection=str(path))


# ---- speculative policies: targets from the model's own routers --------------------------------------
@pytest.fixture(scope="module")
def routers():
    model = build_default_model()
    layers = find_moe_layers(model)
    return lambda layer, h: torch.softmax(layers[layer].router(h)[0].float(), dim=-1)


def expected_keys(route, layer: int, hidden: torch.Tensor, J: int = 60, k: int = 4) -> set[int]:
    return {layer * J + e for e in route(layer, hidden).topk(k, dim=-1).indices.reshape(-1).tolist()}


@pytest.mark.parametrize("name,options,layer,targets", [
    ("mixtral-offloading", {}, 2, [3]),
    ("promoe", {"stride": 2}, 2, [4]),
    ("promoe", {"stride": 2}, 0, [1, 2]),
    ("promoe", {"stride": 3}, 6, []),
])
def test_speculative_policies_prefetch_the_later_routers_top_k(routers, name, options, layer, targets):
    p = bound(name, L=8, J=60, k=4, route=routers, **options)
    hidden = torch.randn(4, 128, generator=torch.Generator().manual_seed(layer))
    rows = arr(0, 0, -1, 1)                                                  # row 2 is padding
    pf = p.on_layer_routed(LayerRouting(layer, torch.zeros(4, 4, dtype=torch.long), rows, None, hidden))
    real = hidden[[0, 1, 3]]
    want = set().union(*[expected_keys(routers, m, real) for m in targets]) if targets else set()
    assert set(pf.keys.tolist()) == want


# ---- the oracle is a bound on bytes -------------------------------------------------------------------
def skewed_trace(seed: int = 0, R: int = 12, L: int = 4, J: int = 16, k: int = 2, iters: int = 8) -> Trace:
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(J, 0.3), size=L)                             # per-layer skewed popularity
    P, N = 3, R * (3 + iters - 1)
    topk = np.stack([np.stack([rng.choice(J, k, replace=False, p=pop[layer]) for layer in range(L)]) for _ in range(N)])
    return Trace("synthetic", L, J, k, offsets=np.arange(R + 1) * (P + iters - 1), prompt_lens=np.full(R, P),
                 iterations=np.full(R, iters), token_ids=rng.integers(0, 50, N), topk=topk)


OTHERS = ["lru", "lfu", "deepspeed", "moe-infinity"]


@pytest.mark.parametrize("bandwidth", [float("inf"), 2e3])
def test_oracle_copies_no_more_bytes_than_any_policy_on_a_synthetic_trace(bandwidth):
    cost = CostModel(expert_bytes=10, bandwidth_Bps=bandwidth, layer_time_s=0.01)
    rows = simulate(skewed_trace(), OTHERS + ["oracle"], ["25%", "50%"], cost)
    by = {(r["policy"], r["expert_budget_bytes"]): r["bytes_copied"] for r in rows}
    for (policy, budget), copied in by.items():
        assert by[("oracle", budget)] <= copied, (policy, budget)


def test_oracle_copies_no_more_bytes_than_any_policy_on_real_flame_routing():
    trace = load_trace(str(require_shared("data", "traces", "flame_moe_290m.npz")) + "#first10").head(24)
    rows = simulate(trace, OTHERS + ["oracle"], ["25%"], CostModel(expert_bytes=1000, bandwidth_Bps=1e6))
    copied = {r["policy"]: r["bytes_copied"] for r in rows}
    assert copied["oracle"] <= min(copied[p] for p in OTHERS)


# ---- exactness in the engine --------------------------------------------------------------------------
PROMPTS = [list(b"The cat sat"), list(b"Offloading experts is")]
MAX_NEW = 6


@pytest.fixture(scope="module")
def reference_tokens():
    return reference_greedy(build_default_model(), PROMPTS, MAX_NEW, pad_id=257)


@pytest.fixture(scope="module")
def recorded_trace():
    engine = Engine.from_config(EngineConfig(device="cpu", policy="record", expert_budget="10%", show_progress=False))
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    return engine.policy.to_trace(engine.model_name, engine.geometry.expert_bytes)


@pytest.mark.parametrize("policy", ["lfu", "deepspeed", "moe-infinity", "mixtral-offloading", "promoe", "oracle"])
def test_greedy_tokens_equal_transformers_with_every_baseline(policy, reference_tokens, recorded_trace):
    options = {"trace": recorded_trace} if policy == "oracle" else {}
    engine = Engine.from_config(EngineConfig(device="cpu", policy=policy, policy_options=options,
                                             expert_budget="10%", show_progress=False))
    reqs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    summary = engine.summary(reqs)
    engine.close()
    assert [r.output_ids for r in reqs] == reference_tokens
    assert summary["misses"] > 0                                           # it really offloaded


def test_oracle_without_a_trace_names_the_fix():
    with pytest.raises(ConfigError, match="trace=PATH"):
        create_policy("oracle")

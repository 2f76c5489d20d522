"""FineMoE planning: delta selection, prefetch priorities, eviction order, layer coverage."""
import numpy as np
import torch

from finemoe.policies.finemoe.map_store import MapStore, StoreSpec
from finemoe.policies.finemoe.planner import IterationPlanner
from finemoe.policies.finemoe.arrays import HOST
from finemoe.policies.finemoe.selection import EvictionScores, delta_select, layer_prefetch, plan_layer, plan_layers

ROW = np.array([[0.5, 0.3, 0.15, 0.05]])


def chosen(scores, top_k, rows=ROW):
    return [np.flatnonzero(m).tolist() for m in delta_select(rows, np.asarray(scores, float), top_k)]


def test_delta_is_one_minus_similarity_and_takes_the_smallest_covering_set():
    assert chosen([0.25], 1) == [[0, 1]]        # delta 0.75: 0.5 + 0.3 >= 0.75
    assert chosen([0.45], 1) == [[0, 1]]        # delta 0.55
    assert chosen([0.6], 1) == [[0]]            # delta 0.4: 0.5 alone suffices


def test_never_fewer_than_top_k_and_delta_is_clipped():
    assert chosen([1.0], 2) == [[0, 1]]         # delta 0 -> top-k
    assert chosen([0.9], 3) == [[0, 1, 2]]
    assert chosen([-0.5], 1) == [[0, 1, 2, 3]]  # delta clipped to 1 -> every expert


def test_rows_are_selected_independently():
    rows = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    assert chosen([0.6, 0.2], 1, rows) == [[0], [1, 2]]


def test_the_single_row_shortcut_plans_exactly_what_the_general_selection_plans():
    rng = np.random.default_rng(0)
    for _ in range(400):
        J, k, G = int(rng.choice([8, 60])), int(rng.choice([1, 2, 4])), int(rng.integers(1, 4))
        rows = rng.dirichlet(np.full(J, float(rng.choice([0.05, 0.3, 1.0]))), size=(G, 1)).astype(np.float32)
        if rng.random() < 0.3:
            rows = np.round(rows, 2)                          # ties, also at the top-k cut
        scores = (rng.random((G, 1)) * 1.2 - 0.1).astype(np.float32)
        delta = bool(rng.random() < 0.8)
        got = plan_layers(list(range(G)), rows, scores, k, delta)
        mask = delta_select(rows[:, 0], scores[:, 0] if delta else np.ones(G), k)
        for g, plan in enumerate(got):
            ref = plan_layer(g, rows[g], mask[g:g + 1], J)
            assert np.array_equal(plan.keys, ref.keys) and np.array_equal(plan.p, ref.p)
            assert np.array_equal(plan.row_p, ref.row_p)


def test_best_k_matches_a_stable_sort_including_ties():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n, B = int(rng.choice([5, 50, 1000])), int(rng.integers(1, 4))
        sim = rng.random((n, B)).astype(np.float32)
        if rng.random() < 0.5:
            sim = np.round(sim, 1)                            # many ties
        idx, val = HOST.best(sim, 4)
        ref = np.argsort(-sim, axis=0, kind="stable")[:4]
        assert np.array_equal(idx, ref) and np.array_equal(val, np.take_along_axis(sim, ref, 0))


def test_priority_is_probability_over_layer_distance():
    pf = layer_prefetch(3, 1, np.array([[0.5, 0.3, 0.2]]), np.array([[True, False, True]]), num_experts=3)
    assert pf.keys.tolist() == [9, 11] and np.allclose(pf.priority, [0.25, 0.1])
    first = layer_prefetch(0, -1, np.array([[0.5, 0.3, 0.2]]), np.array([[True, False, False]]), num_experts=3)
    assert first.keys.tolist() == [0] and np.allclose(first.priority, [0.5])


def test_batch_prefetch_is_the_union_with_the_highest_probability():
    rows = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    pf = layer_prefetch(1, 0, rows, np.array([[True, False, False], [False, True, False]]), num_experts=3)
    assert pf.keys.tolist() == [3, 4] and np.allclose(pf.priority, [0.5, 0.6])


def test_eviction_takes_lowest_p_times_freq_first():
    s = EvictionScores(4)
    s.guide(0, np.array([0.5, 0.1, 0.9, 0.2]))
    s.used(np.array([0, 1, 2]))
    s.used(np.array([0, 1, 2]))
    s.used(np.array([2]))
    # p*freq = 1.0, 0.2, 2.7, 0.0 (floats, not truncated)
    assert s.victims(np.arange(4), 4).tolist() == [3, 1, 0, 2]
    assert s.victims(np.array([0, 2]), 1).tolist() == [0]


def test_eviction_ties_go_to_the_least_recently_used():
    s = EvictionScores(3)
    s.used(np.array([2]))
    s.used(np.array([0]))
    s.used(np.array([1]))
    assert s.victims(np.arange(3), 3).tolist() == [2, 0, 1]   # all p=0


def test_ema_eviction_keeps_the_experts_the_router_has_favoured_lately():
    s = EvictionScores(3, "ema", decay=0.5)
    s.observed(0, np.array([0.8, 0.1, 0.1]))       # ema = 0.4, 0.05, 0.05
    s.observed(0, np.array([0.0, 0.2, 0.8]))       # ema = 0.2, 0.125, 0.425
    assert np.allclose(s.ema, [0.2, 0.125, 0.425])
    assert s.victims(np.arange(3), 3).tolist() == [1, 0, 2]
    both = EvictionScores(3, "ema+p", decay=0.5)
    both.observed(0, np.array([0.0, 0.2, 0.8]))    # ema = 0, 0.1, 0.4
    both.guide(0, np.array([0.5, 0.0, 0.0]))       # + p: 0.5, 0.1, 0.4
    assert both.victims(np.arange(3), 3).tolist() == [1, 2, 0]


def covered(mode, L=6, d=2):
    store = MapStore(StoreSpec("m", L, 3, 2, "token", d, 4))
    store.add(torch.rand(L * 3), torch.rand(2))
    planner = IterationPlanner(store, batch=2, distance=d, mode=mode)
    layers = [g.layer for g in planner.begin(torch.rand(2, 2))]
    for layer in range(L):
        g = planner.observe(layer, torch.rand(2, 3))
        if g is not None:
            assert g.layer == layer + d and g.rows.shape == (2, 3)
            layers.append(g.layer)
    return sorted(layers), planner


def test_every_layer_is_guided_exactly_once():
    layers, planner = covered("both")
    assert layers == list(range(6))
    assert planner.complete_maps().shape == (2, 18)


def test_single_search_variants_cover_their_layers():
    assert covered("semantic")[0] == list(range(6))
    assert covered("trajectory")[0] == [2, 3, 4, 5]
    assert covered("both", L=3, d=5)[0] == [0, 1, 2]     # d >= L: semantic covers everything


def test_an_empty_store_guides_nothing():
    store = MapStore(StoreSpec("m", 4, 3, 2, "token", 1, 4))
    planner = IterationPlanner(store, batch=1, distance=1, mode="both")
    assert planner.begin(torch.rand(1, 2)) == [] and planner.observe(0, torch.rand(1, 3)) is None

"""FineMoE planning: delta selection, prefetch priorities, eviction order, layer coverage."""
import numpy as np
import torch

from finemoe.policies.finemoe.eviction import EvictionScores, guided, observed, used
from finemoe.policies.finemoe.map_store import MapStore, StoreSpec
from finemoe.policies.finemoe.planner import IterationPlanner
from finemoe.policies.finemoe.selection import Selection, choose, layer_union
from helpers import victims

ROW = np.array([0.5, 0.3, 0.15, 0.05], np.float32)


def chosen(score, top_k, row=ROW, delta=True, floor=0.0):
    taken, order = np.zeros(row.size, bool), np.zeros(row.size, np.int64)
    n = choose(row, np.float32(score), Selection(top_k, delta, floor), taken, order)
    assert n == taken.sum()
    return np.flatnonzero(taken).tolist()


def test_delta_is_one_minus_similarity_and_takes_the_smallest_covering_set():
    assert chosen(0.25, 1) == [0, 1]            # delta 0.75: 0.5 + 0.3 >= 0.75
    assert chosen(0.45, 1) == [0, 1]            # delta 0.55
    assert chosen(0.6, 1) == [0]                # delta 0.4: 0.5 alone suffices


def test_never_fewer_than_top_k_and_delta_is_clipped():
    assert chosen(1.0, 2) == [0, 1]             # delta 0 -> top-k
    assert chosen(0.9, 3) == [0, 1, 2]
    assert chosen(-0.5, 1) == [0, 1, 2, 3]      # delta clipped to 1 -> every expert
    assert chosen(-0.5, 2, delta=False) == [0, 1]   # selection=topk


def test_ties_go_to_the_lower_id_and_the_floor_drops_unlikely_extras_beyond_top_k():
    row = np.array([0.1, 0.3, 0.3, 0.2, 0.1], np.float32)
    assert chosen(0.5, 1, row) == [1, 2]        # 0.3 + 0.3 >= 0.5
    assert chosen(0.1, 1, row) == [0, 1, 2, 3]  # 0.9: the tie at 0.1 goes to id 0
    assert chosen(0.1, 1, row, floor=0.25) == [1, 2]   # beyond top-1, only the extras >= 0.25 stay
    assert chosen(0.1, 2, ROW, floor=0.9) == [0, 1]    # the top-k always stays


def union(layer, layer_now, rows, scores, top_k=1):
    rows = np.asarray(rows, np.float32)
    J = rows.shape[1]
    keys, prio, row_p = np.zeros(J, np.int64), np.zeros(J), np.zeros(J, np.float32)
    n = layer_union(rows, np.asarray(scores, np.float32), Selection(top_k), layer, layer_now, np.zeros(J, bool),
                    np.zeros(J, np.int64), np.zeros(J, np.float32), row_p, keys, prio)
    return keys[:n].tolist(), prio[:n], row_p


def test_priority_is_probability_over_layer_distance():
    keys, prio, _ = union(3, 1, [[0.5, 0.3, 0.2]], [0.3])               # delta 0.7: experts 0 and 1
    assert keys == [9, 10] and np.allclose(prio, [0.25, 0.15])
    keys, prio, _ = union(0, -1, [[0.5, 0.3, 0.2]], [1.0])
    assert keys == [0] and np.allclose(prio, [0.5])


def test_batch_prefetch_is_the_union_with_the_highest_probability():
    keys, prio, row_p = union(1, 0, [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], [1.0, 1.0])
    assert keys == [3, 4] and np.allclose(prio, [0.5, 0.6])
    assert np.allclose(row_p, [0.5, 0.6, 0.3])                          # the eviction p: every expert's highest


def scores(total=4, rule="pfreq", decay=0.5):
    return EvictionScores(total, total, rule, decay)


def test_eviction_takes_lowest_p_times_freq_first():
    s = scores()
    guided(s.state, 0, np.array([0.5, 0.1, 0.9, 0.2], np.float32))
    used(s.state, 0, np.array([0, 1, 2]))
    used(s.state, 0, np.array([0, 1, 2]))
    used(s.state, 0, np.array([2]))
    # p*freq = 1.0, 0.2, 2.7, 0.0 (floats, not truncated)
    assert victims(s.rank, list(range(4)), 4) == [3, 1, 0, 2]
    assert victims(s.rank, [0, 2], 1) == [0]


def test_eviction_ties_go_to_the_least_recently_used():
    s = scores(3)
    for e in (2, 0, 1):
        used(s.state, 0, np.array([e]))
    assert victims(s.rank, list(range(3)), 3) == [2, 0, 1]   # all p=0


def test_ema_eviction_keeps_the_experts_the_router_has_favoured_lately():
    s = scores(3, "ema")
    observed(s.state, 0, np.array([[0.8, 0.1, 0.1]], np.float32))       # ema = 0.4, 0.05, 0.05
    observed(s.state, 0, np.array([[0.0, 0.2, 0.8]], np.float32))       # ema = 0.2, 0.125, 0.425
    assert np.allclose(s.state.ema, [0.2, 0.125, 0.425])
    assert victims(s.rank, list(range(3)), 3) == [1, 0, 2]
    both = scores(3, "ema+p")
    observed(both.state, 0, np.array([[0.0, 0.2, 0.8], [0.0, 0.1, 0.2]], np.float32))   # max over rows: 0, 0.1, 0.4
    guided(both.state, 0, np.array([0.5, 0.0, 0.0], np.float32))         # + p: 0.5, 0.1, 0.4
    assert victims(both.rank, list(range(3)), 3) == [1, 2, 0]


def planner_of(store, batch, d, mode, **kw):
    L, J = store.spec.num_layers, store.spec.num_experts
    s = EvictionScores(L * J, J)
    opts = dict(neighbors=1, window=0, keep_map_dots=False, select=Selection(1, delta=False), max_prefetch=0,
                resident=np.zeros(L * J, bool), scores=s.state)
    opts.update(kw)
    return IterationPlanner(store, batch, d, mode, **opts), s


def covered(mode, L=6, d=2):
    store = MapStore(StoreSpec("m", L, 3, 2, "token", d, 4))
    store.add(torch.rand(L * 3), torch.rand(2))
    planner, _ = planner_of(store, 2, d, mode)
    guided_layers = [planner.begin(lambda: torch.rand(2, 2)).keys // 3]
    for layer in range(L):
        pf = planner.observe(layer, torch.rand(2, 3).numpy())
        assert np.all(pf.keys // 3 == layer + d)
        guided_layers.append(pf.keys // 3)
    return sorted(set(np.concatenate(guided_layers).tolist())), planner


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
    planner, _ = planner_of(store, 1, 1, "both")
    assert len(planner.begin(lambda: torch.rand(1, 2))) == 0
    assert len(planner.observe(0, np.ones((1, 3), np.float32))) == 0

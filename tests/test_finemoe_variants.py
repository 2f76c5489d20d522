"""FineMoE's non-paper options (neighbors, window): hand-computed cases; neighbors=1, window=0 is the paper."""
import numpy as np
import pytest
import torch

from finemoe.errors import ConfigError
from finemoe.policies.finemoe import FineMoEPolicy
from finemoe.policies.finemoe.eviction import EvictionScores
from finemoe.policies.finemoe.map_store import MapStore, StoreSpec
from finemoe.policies.finemoe.planner import IterationPlanner
from finemoe.policies.finemoe.search import blend, semantic_topk
from finemoe.policies.finemoe.selection import Selection


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def store_of(maps, sems, L, J):
    store = MapStore(StoreSpec(f"m|L={L}|J={J}", L, J, len(sems[0]), "token", 1, len(maps)))
    for m, s in zip(maps, sems):
        store.add(t(*m), t(*s))
    return store


def two_entry_store():
    # L=2, J=2. y0: map [1,0 | 1,0], sem [1,0]; y1: map [0,1 | 0,1], sem [0,1]
    return store_of([(1, 0, 1, 0), (0, 1, 0, 1)], [(1, 0), (0, 1)], L=2, J=2)


def test_semantic_topk_keeps_the_k_best_entries_best_first():
    idx, score = semantic_topk(two_entry_store(), t(0.6, 0.8).view(1, 2), k=2)   # cos y0 = 0.6, y1 = 0.8
    assert idx.tolist() == [[1], [0]] and score[:, 0].tolist() == pytest.approx([0.8, 0.6])


def blended(store, idx, score, layer):
    row = np.zeros(store.spec.num_experts, np.float32)
    blend(store.maps_np, layer, np.asarray(idx, np.int64), np.asarray(score, np.float32), len(idx), row)
    return row.tolist()


def test_blend_weights_rows_by_similarity():
    store = two_entry_store()
    idx, score = semantic_topk(store, t(0.6, 0.8).view(1, 2), k=2)
    # rows: 0.8/1.4 * y1's [0, 1] + 0.6/1.4 * y0's [1, 0]
    assert blended(store, idx[:, 0], score[:, 0], 1) == pytest.approx([0.6 / 1.4, 0.8 / 1.4])


def test_blend_of_one_neighbour_is_the_matched_row_itself():
    assert blended(two_entry_store(), [1], [0.8], 0) == [0.0, 1.0]


def test_blend_with_no_positive_similarity_averages_equally():
    assert blended(two_entry_store(), [0, 1], [-0.5, 0.0], 0) == pytest.approx([0.5, 0.5])


def planner_of(store, distance=1, neighbors=1, window=0):
    L, J = store.spec.num_layers, store.spec.num_experts
    s = EvictionScores(L * J, J)
    return IterationPlanner(store, 1, distance, "both", neighbors, window, False, Selection(1), 0,
                            np.zeros(L * J, bool), s.state), s


def window_store():
    # L=3, J=2. y0 routes to expert 0 at every layer; y1 to expert 1 (twice as strongly at layer 2)
    return store_of([(1, 0, 1, 0, 1, 0), (0, 1, 0, 1, 0, 2)], [(1, 0), (0, 1)], L=3, J=2)


def observe_all(window=0):
    """The request routes 0, 0, then 1; d = 0 (each layer's search guides that layer) -> the last match."""
    planner, _ = planner_of(window_store(), distance=0, window=window)
    for layer, probs in enumerate([(1, 0), (1, 0), (0, 1)]):
        planner.observe(layer, np.array([probs], np.float32))
    traj = planner.state.traj
    return int(traj.idx[0, 0]), float(traj.val[0, 0])


def test_whole_prefix_trajectory_follows_the_long_history():
    idx, score = observe_all()
    # layers 0..2: y0 = 2 / (sqrt 3 * sqrt 3) = 2/3, y1 = 2 / (sqrt 6 * sqrt 3)
    assert idx == 0 and score == pytest.approx(2 / 3)


def test_windowed_trajectory_follows_the_last_layers_with_window_norms():
    idx, score = observe_all(window=1)
    # layer 2 only: y1 = 2 / (2 * 1) = 1 (its norm over the window, not over the whole prefix), y0 = 0
    assert idx == 1 and score == pytest.approx(1.0)
    # layers 1..2: y0 = 1 / (sqrt 2 * sqrt 2), y1 = 2 / (sqrt 5 * sqrt 2)
    assert observe_all(window=2) == (1, pytest.approx(2 / 10 ** 0.5))


def test_window_longer_than_the_prefix_is_the_whole_prefix():
    assert observe_all(window=5) == pytest.approx(observe_all())


def test_planner_guides_with_blended_neighbours():
    planner, s = planner_of(two_entry_store(), neighbors=2)
    pf = planner.begin(lambda: t(0.6, 0.8).view(1, 2))                          # d=1: layer 0 only
    assert pf.keys.tolist() == [1] and s.state.p[:2].tolist() == pytest.approx([0.6 / 1.4, 0.8 / 1.4])
    after = planner.observe(0, np.array([[1, 0]], np.float32))                   # cos y0 = 1, y1 = 0
    assert after.keys.tolist() == [2] and s.state.p[2:].tolist() == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("opts", [{"neighbors": 0}, {"neighbors": True}, {"neighbors": 1.5}, {"window": -1}])
def test_bad_option_values_are_clear_errors(opts):
    name = next(iter(opts))
    with pytest.raises(ConfigError, match=name):
        FineMoEPolicy(**opts)


def test_default_blends_four_neighbours_over_the_whole_prefix_and_the_paper_method_stays_selectable():
    assert (FineMoEPolicy().neighbors, FineMoEPolicy().window) == (4, 0)     # measured best on both prompt sets
    assert FineMoEPolicy(neighbors=1).neighbors == 1                        # the paper's single best map

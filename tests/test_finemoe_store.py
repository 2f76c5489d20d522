"""FineMoE map store: RDY replacement, search, persistence and its error cases (hand-computed)."""
import os

import numpy as np
import pytest
import torch

from finemoe.policies.finemoe.eviction import EvictionScores
from finemoe.policies.finemoe.map_store import MapStore, MapStoreError, StoreSpec, rdy
from finemoe.policies.finemoe.planner import IterationPlanner
from finemoe.policies.finemoe.search import semantic_topk
from finemoe.policies.finemoe.selection import Selection


def spec(**kw):
    base = dict(model="m|L=2|J=2", num_layers=2, num_experts=2, embed_dim=2, semantic="token", distance=1, capacity=2)
    base.update(kw)
    return StoreSpec(**base)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def filled_store(**kw):
    store = MapStore(spec(**kw))
    store.add(t(1, 0, 1, 0), t(1, 0))   # y0
    store.add(t(0, 1, 0, 1), t(0, 1))   # y1
    return store


def test_store_appends_until_full():
    store = MapStore(spec(capacity=3))
    assert [store.add(t(1, 0, 1, 0), t(1, 0)), store.add(t(0, 1, 0, 1), t(0, 1))] == [0, 1]
    assert store.size == 2 and not store.full and store.replaced == 0


def test_rdy_replaces_the_most_redundant_entry():
    # d=1, L=2: RDY = 0.5 cos(sem) + 0.5 cos(map). x = map [1,0,0,1], sem [1,0]
    # vs y0: 0.5*1 + 0.5*(1/2) = 0.75; vs y1: 0.5*0 + 0.5*(1/2) = 0.25  -> y0 is replaced
    store = filled_store()
    x_map, x_sem = t(1, 0, 0, 1), t(1, 0)
    assert np.allclose(store.rdy(x_map, x_sem)[0], [0.75, 0.25])
    assert store.add(x_map, x_sem) == 0
    assert torch.equal(store.entry_maps(slice(0, 1))[0], x_map) and store.replaced == 1 and store.size == 2


def test_rdy_weights_follow_the_prefetch_distance():
    # d=2=L: only the semantic cosine counts, so the sem-identical y1 goes although its map differs
    store = filled_store(distance=2)
    assert store.add(t(1, 0, 1, 0), t(0, 1)) == 1


def test_semantic_search_picks_the_closest_embedding():
    store = filled_store()
    idx, score = semantic_topk(store, t(0.6, 0.8).view(1, 2))
    assert idx.tolist() == [[1]] and score.item() == pytest.approx(0.8)


def test_trajectory_search_uses_the_observed_prefix_only():
    store = MapStore(spec())
    store.add(t(0.6, 0.8, 1, 0), t(1, 0))   # y0
    store.add(t(1, 0, 0, 1), t(0, 1))       # y1
    planner = planner_of(store, distance=0)                # d = 0: a layer's search guides the layer itself
    traj = planner.state.traj
    planner.observe(0, np.array([[1, 0]], np.float32))     # layer 0: cos y0 = 0.6, y1 = 1
    assert traj.idx[0, 0] == 1 and traj.val[0, 0] == pytest.approx(1.0)
    planner.observe(1, np.array([[1, 0]], np.float32))     # layers 0..1: y0 = 1.6/2 = 0.8, y1 = 1/2
    assert traj.idx[0, 0] == 0 and traj.val[0, 0] == pytest.approx(0.8)


def planner_of(store, distance=1, keep_map_dots=False):
    L, J = store.spec.num_layers, store.spec.num_experts
    return IterationPlanner(store, 1, distance, "both", 1, 0, keep_map_dots, Selection(2), 0, np.zeros(L * J, bool),
                            EvictionScores(L * J, J).state)


def test_save_load_round_trip(tmp_path):
    store = MapStore(spec(capacity=4))
    store.add(t(0.25, 0.75, 0.5, 0.5), t(1, 2))
    store.add(t(0.125, 0.875, 1, 0), t(3, 4))
    path = str(tmp_path / "s.safetensors")
    store.save(path)
    back = MapStore.load(path, spec(capacity=4))
    assert back.spec == store.spec and back.size == 2 and back.maps.dtype == torch.float32
    assert torch.equal(back.entry_maps(slice(0, 2)), store.entry_maps(slice(0, 2)))
    assert torch.equal(back.sems[:2], store.sems[:2])
    assert torch.allclose(back.prefix_sq[:2], store.prefix_sq[:2])
    assert torch.equal(back.prefix_norm, back.prefix_sq.sqrt())       # the search's prefix norms come back too
    assert os.listdir(tmp_path) == ["s.safetensors"]   # no temporary file left behind


def test_save_replaces_atomically(tmp_path):
    path = str(tmp_path / "s.safetensors")
    filled_store().save(path)
    bigger = MapStore(spec(capacity=3))
    for _ in range(3):
        bigger.add(t(1, 0, 1, 0), t(1, 0))
    bigger.save(path)
    assert MapStore.load(path).size == 3 and os.listdir(tmp_path) == ["s.safetensors"]


def test_loading_a_store_of_another_model_fails(tmp_path):
    path = str(tmp_path / "s.safetensors")
    filled_store().save(path)
    with pytest.raises(MapStoreError, match="different model.*model: file has 'm\\|L=2\\|J=2'"):
        MapStore.load(path, spec(model="other|L=2|J=2"))
    with pytest.raises(MapStoreError, match="distance"):
        MapStore.load(path, spec(distance=2))


def test_truncated_corrupt_and_missing_files_fail_clearly(tmp_path):
    path = tmp_path / "s.safetensors"
    filled_store().save(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 9])
    with pytest.raises(MapStoreError, match="truncated or corrupt"):
        MapStore.load(str(path))
    path.write_bytes(b"not a store at all")
    with pytest.raises(MapStoreError, match="truncated or corrupt"):
        MapStore.load(str(path))
    with pytest.raises(MapStoreError, match="does not exist"):
        MapStore.load(str(tmp_path / "missing.safetensors"))


def test_a_safetensors_file_that_is_not_a_store_is_refused(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "w.safetensors")
    save_file({"weight": torch.zeros(2)}, path)
    with pytest.raises(MapStoreError, match="not a finemoe map store"):
        MapStore.load(path)


def test_a_float16_store_file_loads_as_float32(tmp_path):
    from safetensors.torch import save_file
    store = filled_store()
    path = str(tmp_path / "s.safetensors")
    meta = {**store.spec.metadata(), "dtype": "float16"}
    save_file({"maps": store.entry_maps(slice(0, 2)).half().contiguous(), "sems": store.sems[:2].half().contiguous()},
              path, metadata=meta)
    back = MapStore.load(path)
    assert back.maps.dtype == torch.float32 and torch.equal(back.entry_maps(slice(0, 2)), store.entry_maps(slice(0, 2)))


def test_rdy_reads_the_full_map_products_the_trajectory_search_summed():
    rng = np.random.default_rng(0)
    L, J, C = 4, 6, 20
    store = MapStore(StoreSpec("m", L, J, 3, "token", 1, C))
    for m, s in zip(rng.random((C, L * J), dtype=np.float32), rng.random((C, 3), dtype=np.float32)):
        store.add(torch.from_numpy(m), torch.from_numpy(s))
    planner = planner_of(store, keep_map_dots=True)
    x, sem = rng.random((L, J), dtype=np.float32), torch.from_numpy(rng.random(3, dtype=np.float32))
    for layer in range(L):
        assert planner.map_dots() is None                      # not before every layer was observed
        planner.observe(layer, x[layer][None])
    dots = planner.map_dots()[:, 0]                            # [C]
    assert np.allclose(dots, store.entry_maps(slice(0, C)).numpy() @ x.reshape(-1), rtol=1e-5)
    assert np.allclose(store.rdy(x.reshape(-1), sem, dots)[0], store.rdy(x.reshape(-1), sem)[0], rtol=1e-5)
    store.add(torch.from_numpy(x.reshape(-1)), sem)
    assert planner.map_dots() is None                          # the store changed: the products are stale


def test_a_duplicate_entry_is_replaced_first_and_exact_ties_go_to_the_first_entry():
    rng = np.random.default_rng(1)
    store = MapStore(StoreSpec("m", 3, 5, 4, "token", 1, 6))
    maps, sems = rng.random((6, 15), dtype=np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    maps[4], sems[4] = maps[1], sems[1]                        # entries 1 and 4 are the same
    for m, s in zip(maps, sems):
        store.add(m, s)
    values, best = store.rdy(maps[1], sems[1])
    assert best == 1 and values[1] == values[4] == values.max()
    assert store.add(maps[1], sems[1]) == 1 and store.replaced == 1


def test_rdy_takes_the_first_of_equal_scores():
    f = np.ones(4, np.float32)
    dots = np.array([1, 3, 3, 2], np.float32)
    assert rdy(dots, dots, np.ones(6, np.float32), f[:3], f, f, np.float32(0.5), np.float32(0.5), f.copy()) == 1

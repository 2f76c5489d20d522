"""FineMoE map store: RDY replacement, search, persistence and its error cases (hand-computed)."""
import os

import numpy as np
import pytest
import torch

from finemoe.policies.finemoe.map_store import MapStore, MapStoreError, StoreSpec
from finemoe.policies.finemoe.search import TrajectorySearch, semantic_search


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
    assert np.allclose(store.rdy(x_map, x_sem), [0.75, 0.25])
    assert store.add(x_map, x_sem) == 0
    assert torch.equal(store.entry_maps(slice(0, 1))[0], x_map) and store.replaced == 1 and store.size == 2


def test_rdy_weights_follow_the_prefetch_distance():
    # d=2=L: only the semantic cosine counts, so the sem-identical y1 goes although its map differs
    store = filled_store(distance=2)
    assert store.add(t(1, 0, 1, 0), t(0, 1)) == 1


def test_semantic_search_picks_the_closest_embedding():
    store = filled_store()
    idx, score = semantic_search(store, t(0.6, 0.8).view(1, 2))
    assert idx.tolist() == [1] and score.item() == pytest.approx(0.8)


def test_trajectory_search_uses_the_observed_prefix_only():
    store = MapStore(spec())
    store.add(t(0.6, 0.8, 1, 0), t(1, 0))   # y0
    store.add(t(1, 0, 0, 1), t(0, 1))       # y1
    search = TrajectorySearch(store, batch=1)
    idx, score = search.observe(0, t(1, 0).view(1, 2))   # layer 0: cos y0 = 0.6, y1 = 1
    assert idx.tolist() == [1] and score.item() == pytest.approx(1.0)
    idx, score = search.observe(1, t(1, 0).view(1, 2))   # layers 0..1: y0 = 1.6/2 = 0.8, y1 = 1/2
    assert idx.tolist() == [0] and score.item() == pytest.approx(0.8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_round_trip(tmp_path, dtype):
    store = MapStore(spec(capacity=4), dtype)
    store.add(t(0.25, 0.75, 0.5, 0.5), t(1, 2))
    store.add(t(0.125, 0.875, 1, 0), t(3, 4))
    path = str(tmp_path / "s.safetensors")
    store.save(path)
    back = MapStore.load(path, spec(capacity=4))
    assert back.spec == store.spec and back.size == 2 and back.maps.dtype == dtype
    assert torch.equal(back.entry_maps(slice(0, 2)), store.entry_maps(slice(0, 2))) and torch.equal(back.sems[:2], store.sems[:2])
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


@pytest.mark.parametrize("compiled", [True, False])
def test_rdy_reads_the_full_map_products_the_trajectory_search_summed(compiled):
    from finemoe.policies.finemoe.planner import IterationPlanner
    from finemoe.policies.finemoe.selection import Selection
    rng = np.random.default_rng(0)
    L, J, C = 4, 6, 20
    store = MapStore(StoreSpec("m", L, J, 3, "token", 1, C))
    for m, s in zip(rng.random((C, L * J), dtype=np.float32), rng.random((C, 3), dtype=np.float32)):
        store.add(torch.from_numpy(m), torch.from_numpy(s))
    planner = IterationPlanner(store, 1, 1, "both", keep_map_dots=True)
    planner.one_row = compiled
    x, sem = rng.random((L, J), dtype=np.float32), torch.from_numpy(rng.random(3, dtype=np.float32))
    for layer in range(L):
        assert planner.map_dots() is None                      # not before every layer was observed
        planner.observe_plan(layer, x[layer][None], Selection(2))
    dots = planner.map_dots()[:, 0]                            # [C]
    assert np.allclose(dots, store.entry_maps(slice(0, C)).numpy() @ x.reshape(-1), rtol=1e-5)
    assert np.allclose(store.rdy(torch.from_numpy(x.reshape(-1)), sem, dots),
                       store.rdy(torch.from_numpy(x.reshape(-1)), sem), rtol=1e-5)
    store.add(torch.from_numpy(x.reshape(-1)), sem)
    assert planner.map_dots() is None                          # the store changed: the products are stale


def _store_arrays(store):
    return {name: getattr(store, name)[:, : store.size].numpy().tobytes() if name == "maps"
            else getattr(store, name)[: store.size].numpy().tobytes()
            for name in ("maps", "sems", "prefix_sq", "prefix_norm", "sem_norm")}


@pytest.mark.parametrize("L,J,E", [(4, 6, 3), (12, 60, 128), (24, 60, 200)])
def test_compiled_upkeep_replaces_the_same_entry_and_stores_the_same_bits_as_numpy(L, J, E):
    """A host float32 store adds entries through store_kernels (RDY choice, write with norms); the numpy path
    (`rdy(...).argmax()`, `_write`) must pick every replaced slot and store every value identically, with
    and without the trajectory's full-map products, and on exact RDY ties (duplicate entries: the first wins)."""
    rng = np.random.default_rng(L)
    C, n = 16, 40
    compiled, plain = (MapStore(StoreSpec("m", L, J, E, "token", 3, C)) for _ in range(2))
    plain.compiled = False
    assert compiled.compiled
    maps = rng.random((n, L * J), dtype=np.float32) ** 4
    sems = rng.standard_normal((n, E)).astype(np.float32)
    maps[5], sems[5] = maps[2], sems[2]                       # duplicates: exact RDY ties once the store is full
    maps[30], sems[30] = maps[2], sems[2]
    for i, (m, s) in enumerate(zip(maps, sems)):
        dots = compiled.entry_maps(slice(0, compiled.size)).numpy() @ m if i % 2 and compiled.size else None
        assert compiled.add(m, s, dots) == plain.add(torch.from_numpy(m), torch.from_numpy(s), dots)
        assert compiled.version == plain.version
    assert compiled.replaced == plain.replaced == n - C
    assert _store_arrays(compiled) == _store_arrays(plain)


def test_rdy_best_takes_the_first_of_equal_scores():
    from finemoe.policies.finemoe import store_kernels as sk
    f = np.ones(4, np.float32)
    dots = np.array([1, 3, 3, 2], np.float32)
    assert sk.rdy_best(dots, dots, np.ones(6, np.float32), f[:3], f, f, np.float32(0.5), np.float32(0.5)) == 1

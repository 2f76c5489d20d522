"""The compiled one-row search (row_kernels.py) makes the same plans as the numpy array path, to the last bit."""
import numpy as np
import pytest
import torch

from finemoe.policies.finemoe import row_kernels as rk
from finemoe.policies.finemoe.pairwise import pairwise_sum
from finemoe.policies.finemoe.map_store import MapStore, StoreSpec
from finemoe.policies.finemoe.planner import IterationPlanner
from finemoe.policies.finemoe.search import SemanticMemo
from finemoe.policies.finemoe.selection import Selection


def softmax_rows(rng, shape, sharp):
    x = rng.standard_normal(shape).astype(np.float32) * sharp
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def filled_store(rng, L, J, n, capacity=None, E=5):
    store = MapStore(StoreSpec("m", L, J, E, "token", 2, capacity or n))
    maps = softmax_rows(rng, (n, L, J), 3.0)
    maps[n // 2:n // 2 + 2, :L // 2] = maps[0, :L // 2]    # same early layers: exact ties in the trajectory
    maps[n // 2:n // 2 + 2, L // 2:] = maps[n - 1, L // 2:]   # (but not later), broken by the lower entry
    for m, s in zip(maps, rng.standard_normal((n, E)).astype(np.float32)):
        store.add(torch.from_numpy(m.reshape(-1)), torch.from_numpy(s))
    return store


def assert_same_plans(a, b):
    assert [p.layer for p in a] == [p.layer for p in b]
    for x, y in zip(a, b):
        assert np.array_equal(x.keys, y.keys)
        assert x.p.tobytes() == y.p.tobytes()
        assert np.asarray(x.row_p).tobytes() == np.asarray(y.row_p).tobytes()


@pytest.mark.parametrize("J", [8, 60, 130])
@pytest.mark.parametrize("neighbors", [1, 2, 4, 9])
@pytest.mark.parametrize("n", [1, 3, 200])
def test_compiled_and_array_paths_plan_alike(J, neighbors, n):
    rng = np.random.default_rng(J * 100 + neighbors * 10 + n)
    L, d = 6, 2
    store = filled_store(rng, L, J, n)
    for select in (Selection(top_k=2), Selection(top_k=3, delta=False)):
        fast = IterationPlanner(store, 1, d, "both", neighbors)
        slow = IterationPlanner(store, 1, d, "both", neighbors)
        slow.one_row = False
        assert fast.one_row
        sem = torch.from_numpy(rng.standard_normal((1, 5)).astype(np.float32))
        assert_same_plans(fast.begin_plans(sem, select), slow.begin_plans(sem, select))
        for layer in range(L):
            # a real map (the search finds an exact match), a sharp one, a flat one (delta needs many experts)
            probs = [store.maps[layer, 0].numpy()[None], softmax_rows(rng, (1, J), 4.0),
                     softmax_rows(rng, (1, J), 0.1)][layer % 3]
            a, b = fast.observe_plan(layer, probs, select), slow.observe_plan(layer, probs, select)
            assert (a is None) == (b is None)
            if a is not None:
                assert_same_plans([a], [b])
        assert np.array_equal(fast.observed, slow.observed)


def test_memo_path_plans_alike():
    rng = np.random.default_rng(3)
    store = filled_store(rng, 4, 16, 40)
    sem = torch.from_numpy(rng.standard_normal((1, 5)).astype(np.float32))
    fast, slow = IterationPlanner(store, 1, 3, "semantic", 4), IterationPlanner(store, 1, 3, "semantic", 4)
    slow.one_row = False
    plans = [p.begin_plans(sem, Selection(top_k=2), SemanticMemo(store, 4), [7]) for p in (fast, slow)]
    assert len(plans[0]) == 4
    assert_same_plans(*plans)


def test_pairwise_sum_is_numpys_float32_sum():
    rng = np.random.default_rng(0)
    for n in [1, 7, 8, 9, 60, 128, 129, 256, 257, 300, 513, 1000, 1025, 2049, 3000, 4096, 65537, 1_000_003]:
        x = (rng.random(n).astype(np.float32) * 3) ** 3
        assert pairwise_sum(x, 0, n) == x.sum(dtype=np.float32)
        assert pairwise_sum(x, 3, n - 3) == x[3:].sum(dtype=np.float32)      # from an offset


def test_delta_choice_takes_the_smallest_covering_set_with_ties_to_the_lower_id():
    row = np.array([0.1, 0.3, 0.3, 0.2, 0.1], np.float32)
    experts = np.zeros(5, np.int64)
    assert rk.delta_choice(row, np.float32(0.5), 1, True, experts) == 2        # 0.3 + 0.3 >= 0.5
    assert experts[:2].tolist() == [1, 2]
    assert rk.delta_choice(row, np.float32(0.5), 3, True, experts) == 3        # never fewer than top_k
    assert experts[:3].tolist() == [1, 2, 3]
    assert rk.delta_choice(row, np.float32(0.1), 1, True, experts) == 4        # 0.9: ties at 0.1 go to id 0
    assert experts[:4].tolist() == [0, 1, 2, 3]
    assert rk.delta_choice(row, np.float32(0.1), 2, False, experts) == 2       # top-k only


@pytest.mark.parametrize("k", [1, 4, 50])
def test_semantic_search_of_one_row_is_the_array_formula(k):
    from finemoe.policies.finemoe.arrays import HOST
    from finemoe.policies.finemoe.map_store import EPS
    from finemoe.policies.finemoe.search import semantic_topk
    rng = np.random.default_rng(k)
    store = filled_store(rng, 2, 4, 30, E=16)
    store.sems[7] = store.sems[3]                              # an exact tie: the lower entry first
    store._write(7, store.entry_maps(7), store.sems[7])
    q = torch.from_numpy(store.sems[3].numpy()[None] * 2)
    sems, qn = store.sems.numpy(), q.numpy()
    cos = (sems @ qn.T) / np.maximum(store.sem_norm.numpy()[:, None] * np.sqrt(np.maximum((qn * qn).sum(1), 0.0)), EPS)
    want_idx, want_val = HOST.best(cos, k)
    idx, val = semantic_topk(store, q, k)
    assert idx[:2, 0].tolist() == [3, 7][:k]
    assert np.array_equal(idx, want_idx) and val.tobytes() == want_val.tobytes()


def test_a_host_embedding_table_gives_the_modules_vectors():
    from finemoe.models.adapters import ExpertGeometry
    from finemoe.policies.base import CacheView, IterationInfo, PolicyContext
    from finemoe.policies.finemoe.embedding import TokenEmbedder
    emb = torch.nn.Embedding(50, 8)
    ctx = PolicyContext(ExpertGeometry(2, 4, 1, 1, {}, torch.float32), CacheView(np.zeros(8, bool), 2),
                        torch.device("cpu"), embed=emb)
    fast, module = TokenEmbedder(ctx), TokenEmbedder(ctx)
    module.table = None
    assert fast.table is not None
    decode = IterationInfo(0, ["a", "b"], [3, 1], torch.tensor([[4], [9]]), False)
    with torch.inference_mode():
        want = emb(torch.tensor([4, 9]))
    assert torch.equal(torch.as_tensor(fast.embed(decode, [5, 5], False)), want)
    assert torch.equal(module.embed(decode, [5, 5], False), want)


def topic_trace(seed=0, R=8, L=6, J=16, k=2, prompt=3, iters=10):
    """R requests on 3 topics (each topic prefers its own experts per layer), full router probabilities."""
    from finemoe.traces.format import Trace
    rng = np.random.default_rng(seed)
    prefs = rng.standard_normal((3, L, J)).astype(np.float32) * 2.0
    rows = prompt + iters - 1
    topics = rng.integers(0, 3, R)
    logits = prefs[np.repeat(topics, rows)] + rng.standard_normal((R * rows, L, J)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    topk = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    return Trace("topics", L, J, k, offsets=np.arange(R + 1) * rows, prompt_lens=np.full(R, prompt),
                 iterations=np.full(R, iters), token_ids=rng.integers(0, 50, R * rows), topk=topk,
                 probs=probs.astype(np.float16), expert_bytes=1000)


@pytest.mark.parametrize("options", [{}, {"neighbors": 1}, {"eviction": "lfu"}, {"search": "semantic"},
                                     {"selection": "topk", "eviction": "lru"}])
def test_compiled_plans_and_store_upkeep_replay_like_the_array_path(options):
    """The one-row decode path (plans made, guided and prefetched in one compiled call; the store's RDY and
    writes compiled) against the array path (plans, then _to_prefetch; numpy store upkeep), through the
    simulator with a store small enough to replace entries: the same hits, copies and times, and the same
    eviction scores and store contents at the end."""
    from finemoe.policies.finemoe import FineMoEPolicy
    from finemoe.simulator import CostModel
    from finemoe.simulator.replay import Replay

    class ArrayPath(FineMoEPolicy):
        def bind(self, ctx):
            super().bind(ctx)
            self.guide = None               # the plans go through LayerPlan and _to_prefetch
            self.store.compiled = False     # the planner's array path, the store through rdy() and _write

    trace, embed = topic_trace(), torch.nn.Embedding(50, 8)
    runs = []
    for cls in (FineMoEPolicy, ArrayPath):
        policy = cls(capacity=20, prefetch_distance=2, embed=embed, **options)
        replay = Replay(trace, policy, "40%", CostModel(1000, 1e6, 1e-3, 1e-4))
        row = replay.run()
        runs.append((row, policy))
    (a, fast), (b, slow) = runs
    assert fast.store.replaced > 0 and fast.iterations == 80
    assert fast.applied and fast.store.compiled and not slow.applied   # each took its own path
    for key in ("hits", "misses", "bytes_copied", "prefetch_copies", "ttft_s", "tpot_s"):
        assert a[key] == b[key], key
    for name in ("p", "freq", "score", "last_used"):
        assert getattr(fast.scores, name).tobytes() == getattr(slow.scores, name).tobytes(), name
    for name in ("maps", "sems", "prefix_sq", "prefix_norm", "sem_norm"):
        assert getattr(fast.store, name).numpy().tobytes() == getattr(slow.store, name).numpy().tobytes(), name

"""FineMoE's compiled search: ranking ties, the semantic memo, the token embedding table."""
import numpy as np
import pytest
import torch

from finemoe.policies.finemoe.map_store import MapStore, StoreSpec
from finemoe.policies.finemoe.search import SemanticMemo, best_entries, semantic_topk
from finemoe.traces import TraceError


def softmax_rows(rng, shape, sharp):
    x = rng.standard_normal(shape).astype(np.float32) * sharp
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def filled_store(rng, L, J, n, E=5):
    store = MapStore(StoreSpec("m", L, J, E, "token", 2, n))
    for m, s in zip(softmax_rows(rng, (n, L * J), 3.0), rng.standard_normal((n, E)).astype(np.float32)):
        store.add(m, s)
    return store


def test_best_entries_rank_like_a_stable_sort_including_ties():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n, k = int(rng.choice([1, 5, 50])), int(rng.choice([1, 4, 60]))
        dots = rng.random(n).astype(np.float32)
        if rng.random() < 0.5:
            dots = np.round(dots, 1)                                 # many ties: the lower entry first
        idx, val = np.zeros(k, np.int64), np.zeros(k, np.float32)
        K = best_entries(dots, np.ones(n, np.float32), np.float32(1.0), k, idx, val)
        ref = np.argsort(-dots, kind="stable")[:k]
        assert K == min(k, n) and np.array_equal(idx[:K], ref) and np.array_equal(val[:K], dots[ref])


@pytest.mark.parametrize("k", [1, 4, 50])
def test_semantic_search_takes_the_best_cosines_ties_to_the_lower_entry(k):
    rng = np.random.default_rng(k)
    store = filled_store(rng, 2, 4, 30, E=16)
    store._write(7, store.maps_np[:, 3].copy(), store.sems_np[3].copy())          # an exact tie with entry 3
    q = store.sems_np[3][None] * 2
    idx, val = semantic_topk(store, q, k)
    cos = (store.sems_np @ q[0]) / (np.linalg.norm(store.sems_np, axis=1) * np.linalg.norm(q[0]))
    assert idx.shape == (min(k, 30), 1) and idx[:2, 0].tolist() == [3, 7][:k]
    assert np.allclose(val[:, 0], cos[idx[:, 0]], rtol=1e-5)
    assert np.all(np.diff(val[:, 0]) <= 0)


def test_semantic_memo_skips_repeated_decode_tokens_without_changing_results():
    rng = np.random.default_rng(0)
    store = filled_store(rng, 2, 4, 12)
    sem = rng.standard_normal((2, 5)).astype(np.float32)
    memo, calls = SemanticMemo(store, 4), []

    def embed():
        calls.append(1)
        return sem

    first, again = memo.search([4, 5], embed), memo.search([4, 5], embed)
    mixed = memo.search([5, 9], lambda: sem[::-1].copy())                   # 5 from the memo, 9 searched
    direct = semantic_topk(store, sem, 4)                                    # [K, B] each
    assert len(calls) == 1
    for got in (first, again):
        assert np.array_equal(got[0], direct[0]) and np.array_equal(got[1], direct[1])
    assert np.array_equal(mixed[0][:, 0], direct[0][:, 1])
    store.add(rng.random(8, dtype=np.float32), sem[0])                       # the store changed: memo emptied
    memo.search([4, 5], embed)
    assert len(calls) == 2


def test_a_host_embedding_table_gives_the_modules_vectors():
    from finemoe.models.adapters import ExpertGeometry
    from finemoe.policies.base import CacheView, IterationInfo, PolicyContext
    from finemoe.policies.finemoe.embedding import TokenEmbedder
    emb = torch.nn.Embedding(50, 8)
    ctx = PolicyContext(ExpertGeometry(2, 4, 1, 1, {}, torch.float32), CacheView(np.zeros(8, bool), 2),
                        torch.device("cpu"), embed=emb)
    fast, module = TokenEmbedder(ctx), TokenEmbedder(ctx)
    module.host_rows = None
    assert fast.host_rows is not None
    decode = IterationInfo(0, ["a", "b"], [3, 1], torch.tensor([[4], [9]]), False)
    with torch.inference_mode():
        want = emb(torch.tensor([4, 9]))
    assert torch.equal(torch.as_tensor(fast.embed(decode, [5, 5], False)), want)
    assert torch.equal(module.embed(decode, [5, 5], False), want)


def test_a_traces_recorded_rows_give_the_modules_vectors():
    from finemoe.models.adapters import ExpertGeometry
    from finemoe.policies.base import CacheView, IterationInfo, PolicyContext
    from finemoe.policies.finemoe.embedding import TokenEmbedder
    from finemoe.traces.token_rows import TokenRows, embedding_rows
    emb = torch.nn.Embedding(50, 8)
    rows = TokenRows(*embedding_rows(emb, np.array([9, 4, 4, 17]), torch.device("cpu")))
    ctx = PolicyContext(ExpertGeometry(2, 4, 1, 1, {}, torch.float32), CacheView(np.zeros(8, bool), 2),
                        torch.device("cpu"), embed=rows)
    embedder = TokenEmbedder(ctx)
    assert embedder.dim == 8
    decode = IterationInfo(0, ["a", "b"], [3, 1], torch.tensor([[4], [9]]), False)
    prefill = IterationInfo(0, ["a"], [0], torch.tensor([[17, 4, 9]]), True)
    with torch.inference_mode():
        assert torch.equal(torch.as_tensor(embedder.embed(decode, [5, 5], False)), emb(torch.tensor([4, 9])))
        assert torch.allclose(embedder.embed(prefill, [3], False), emb(torch.tensor([17, 4, 9])).mean(0, keepdim=True))
    with pytest.raises(TraceError, match="do not cover token ids \\[5\\]"):
        rows(torch.tensor([4, 5]))

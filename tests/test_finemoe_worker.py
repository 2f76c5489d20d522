"""The search worker thread (the CUDA structure) decides exactly what the inline search decides, and the
semantic-search memo changes no decision."""
import numpy as np
import torch

from finemoe.models.adapters import ExpertGeometry
from finemoe.policies.base import CacheView, IterationInfo, LayerRouting, PolicyContext, RequestInfo
from finemoe.policies.finemoe.policy import FineMoEPolicy
from finemoe.policies.finemoe.search import semantic_topk
from finemoe.policies.finemoe.worker import SearchWorker

L, J, K, E, VOCAB = 6, 8, 2, 16, 12


class LockstepWorker(SearchWorker):
    """The real worker thread, but every job has finished before `submit` returns (as inline)."""

    def submit(self, fn, arg=None):
        super().submit(fn, arg)
        self.wait_idle()


def softmaxes(rng, *shape):
    return torch.softmax(torch.from_numpy(rng.normal(0, 2, shape)).float(), dim=-1)


def make_policy(worker: bool, learn: bool) -> FineMoEPolicy:
    torch.manual_seed(0)
    embed = torch.nn.Embedding(VOCAB, E)
    policy = FineMoEPolicy(async_search=worker, learn=learn, capacity=20, prefetch_distance=2)
    geo = ExpertGeometry(L, J, K, 1, {"w": (1,)}, torch.float32)
    policy.bind(PolicyContext(geo, CacheView(np.zeros(L * J, bool), 12), torch.device("cpu"), embed=embed,
                              model_name="toy"))
    if worker:
        policy.worker.stop()
        policy.worker = LockstepWorker()
    rng = np.random.default_rng(1)
    with torch.no_grad():
        policy.store.add_many(softmaxes(rng, 12, L, J).reshape(12, L * J), embed(torch.arange(12)))
    return policy


@torch.inference_mode()
def decisions(worker: bool, learn: bool) -> list:
    """Every prefetch and victim choice over two requests (prefill of 3 tokens, then decode steps that
    repeat token ids, so the memo is used)."""
    policy, rng, out = make_policy(worker, learn), np.random.default_rng(2), []
    for r, prompt in enumerate([[1, 2, 3], [3, 1, 2]]):
        policy.on_request_start(RequestInfo(f"r{r}", prompt))
        tokens = [prompt, [4], [5], [4], [5], [4]]
        for step, ids in enumerate(tokens):
            it = IterationInfo(step, [f"r{r}"], [step], torch.tensor([ids]), step == 0)
            out.append(policy.on_iteration_start(it))
            for layer in range(L):
                probs = softmaxes(rng, len(ids), J)                              # [T, J]
                top = torch.topk(probs, K).indices
                experts = np.unique(top.numpy())
                policy.on_access(layer, experts, np.ones(experts.size, np.int64))
                out.append(policy.on_layer_routed(LayerRouting(layer, top, np.zeros(len(ids), np.int64), probs)))
                out.append(policy.select_victims(np.arange(0, L * J, 3), 4, True))
            policy.on_iteration_end(it)
        policy.on_request_end(RequestInfo(f"r{r}", prompt))
    policy.close()
    return [(o.keys.tolist(), o.priority.tolist()) if hasattr(o, "keys") else o.tolist() for o in out]


def test_worker_thread_and_inline_search_decide_the_same():
    for learn in (False, True):
        inline = decisions(worker=False, learn=learn)
        assert sum(len(d[0]) for d in inline if isinstance(d, tuple)) > 0          # it did prefetch
        assert decisions(worker=True, learn=learn) == inline


def test_semantic_memo_skips_repeated_decode_tokens_without_changing_results():
    policy = make_policy(worker=False, learn=False)
    sem = policy.ctx.embed(torch.tensor([4, 5]))
    calls = []

    def embed():
        calls.append(1)
        return sem

    first = policy.memo.search([4, 5], embed)
    again = policy.memo.search([4, 5], embed)
    direct = semantic_topk(policy.store, sem, policy.neighbors)                  # [K, B] each
    assert len(calls) == 1
    for got in (first, again):
        assert np.array_equal(got[0], direct[0]) and np.array_equal(got[1], direct[1])
    policy.store.add(torch.rand(L * J), sem[0])                                 # the store changed: memo emptied
    policy.memo.search([4, 5], embed)
    assert len(calls) == 2


def test_deferred_worker_hands_each_result_out_one_drain_later():
    """The simulator's model of the search thread: a search submitted at layer l guides from layer l+1 on."""
    from finemoe.policies.finemoe.worker import DeferredWorker
    w = DeferredWorker()
    w.submit(lambda x: x * 2, 1)
    assert w.drain() == []                      # layer l: its own search has not landed yet
    w.submit(lambda x: x * 2, 2)
    assert w.drain() == [2]                     # layer l+1: layer l's result
    w.wait_idle()
    assert w.drain() == [4]                     # idle: everything has landed

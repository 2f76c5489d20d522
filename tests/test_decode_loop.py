"""The simulator's compiled decode loop (simulator/decode_loop.py): a policy that offers its per-layer callbacks as
compiled functions (Policy.decode_kernels) replays exactly as when the replay calls those callbacks layer by layer:
the same hits, copies, times and policy state, in every miss-compute mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finemoe.experts.prefetch_issue import INFLIGHT, PrefetchIssue
from finemoe.jit import njit
from finemoe.policies.base import EvictionRank, LayerKernels, Policy, Prefetch, register_policy
from finemoe.policies.finemoe import FineMoEPolicy
from finemoe.simulator import CostModel
from finemoe.simulator.replay import Replay
from helpers import topic_trace

FIELDS = ("hits", "misses", "bytes_copied", "prefetch_copies", "wasted_prefetches", "ttft_s", "tpot_s", "simulated_s")


def counting(cls):
    """`cls` counting the decode iterations it handed to the compiled loop; `per_layer=True` hands none."""
    class Counted(cls):
        def __init__(self, *a, per_layer=False, **kw):
            super().__init__(*a, **kw)
            self.callbacks_only, self.looped = per_layer, 0

        def decode_kernels(self, probs):
            kernels = None if self.callbacks_only else super().decode_kernels(probs)
            self.looped += kernels is not None
            return kernels
    return Counted


def replay_both(cls, trace, budget, cost, /, miss_compute="gpu", issue=INFLIGHT, **options):
    rows, policies = [], []
    for per_layer in (False, True):
        policy = counting(cls)(per_layer=per_layer, **options)
        rows.append(Replay(trace, policy, budget, cost, miss_compute=miss_compute, issue=issue).run())
        policies.append(policy)
    return rows, policies


@pytest.mark.parametrize("budget", ["15%", "40%"])
@pytest.mark.parametrize("options", [{}, {"neighbors": 1, "eviction": "lfu"}, {"search": "semantic"}])
def test_finemoe_decode_loop_replays_like_its_per_layer_callbacks(options, budget):
    trace, embed = topic_trace(), torch.nn.Embedding(50, 8)
    (a, b), (looped, per_layer) = replay_both(FineMoEPolicy, trace, budget, CostModel(1000, 1e6, 1e-3, 1e-4),
                                              capacity=20, prefetch_distance=2, embed=embed, **options)
    assert looped.looped > 60 and per_layer.looped == 0       # decode iterations of a non-empty store
    for key in FIELDS:
        assert a[key] == b[key], key
    for name in ("p", "freq", "score", "last_used"):
        assert getattr(looped.scores.state, name).tobytes() == getattr(per_layer.scores.state, name).tobytes(), name
    for name in ("maps", "sems", "prefix_norm"):
        assert getattr(looped.store, name).numpy().tobytes() == getattr(per_layer.store, name).numpy().tobytes()


# ---- any policy: a small one with its own kernels, run by the loop's in-memory (not pre-specialised) form ----
@njit
def touch(layer, experts, counts, state):
    """LRU clock: state = (J, clock [1], last_used [L*J])."""
    J, clock, last_used = state
    clock[0] += 1.0
    for e in experts:
        last_used[layer * J + e] = clock[0]


@njit
def same_experts_next_layer(layer, top_k, probs, aux, state, keys, prio):
    """Prefetch this token's experts in the next layer, in router order; state = (L, J)."""
    L, J = state
    if layer + 1 >= L:
        return 0
    for i in range(top_k.size):
        keys[i] = (layer + 1) * J + top_k[i]
        prio[i] = float(top_k.size - i)
    return top_k.size


@register_policy
class NextLayerGuess(Policy):
    name = "test-next-layer-guess"

    def bind(self, ctx):
        super().bind(ctx)
        g = ctx.geometry
        self.state = (g.num_experts, np.zeros(1), np.full(g.total_experts, -1.0))
        self.shape = (g.num_layers, g.num_experts)
        self.keys, self.prio = np.zeros(g.total_experts, np.int64), np.zeros(g.total_experts)

    def on_access(self, layer, experts, counts):
        touch(layer, experts, counts, self.state)

    def on_layer_routed(self, routing):
        n = same_experts_next_layer(routing.layer, routing.top_k_on_host()[0], np.zeros(0, np.float32),
                                    np.zeros(0, np.float32), self.shape, self.keys, self.prio)
        return Prefetch(self.keys[:n].copy(), self.prio[:n].copy())

    def decode_kernels(self, probs):
        L = self.shape[0]
        return LayerKernels(touch, self.state, same_experts_next_layer, self.shape, np.zeros((L, 0), np.float32))

    def eviction_rank(self):
        return EvictionRank.of(self.state[2])


@pytest.mark.parametrize("budget", ["10%", "50%"])
def test_a_policys_own_kernels_replay_like_its_callbacks(budget):
    trace = topic_trace(seed=3)
    (a, b), (looped, per_layer) = replay_both(NextLayerGuess, trace, budget, CostModel(1000, 2e5, 1e-3, 1e-4))
    assert looped.looped == trace.iterations.sum() - trace.num_requests and per_layer.looped == 0
    assert a["prefetch_copies"] > 0 and a["misses"] > 0
    for key in FIELDS:
        assert a[key] == b[key], key
    assert looped.state[2].tobytes() == per_layer.state[2].tobytes()


# ---- the built-in routing-only baselines: their compiled steps through the pre-specialised loops ----------------
def repeated_topic_trace():
    """topic_trace's requests each twice in a row, then once more (new request ids, same prompts): moe-infinity's
    collection then holds pairs of equal matrices, so the third copy's best match ties exactly (matching.exact_best
    decides)."""
    from dataclasses import replace
    t = topic_trace(seed=5, R=6)
    order = [r for r in range(t.num_requests) for _ in range(2)] + list(range(t.num_requests))
    spans = [np.arange(t.offsets[r], t.offsets[r + 1]) for r in order]
    rows = np.concatenate(spans)
    return replace(t, offsets=np.concatenate([[0], np.cumsum([s.size for s in spans])]),
                   prompt_lens=t.prompt_lens[order], iterations=t.iterations[order], token_ids=t.token_ids[rows],
                   topk=t.topk[rows], probs=t.probs[rows], request_ids=[f"r{r}#{c}" for c, r in enumerate(order)],
                   prompt_texts=None)


def baseline_state(name, policy):
    """The arrays each policy decides from, as bytes."""
    arrays = {"lru": lambda p: (list(p.recency.state[2:]) if p.order == "cycle"
                                else [p.recency.last_used, p.recency.clock]),
              "lfu": lambda p: [p.freq.uses, p.freq.recency.last_used],
              "deepspeed": lambda p: [p.state.clock, p.state.last_used],
              "oracle": lambda p: list(p.order),
              "moe-infinity": lambda p: [p.freq.uses, p.freq.recency.last_used, p.collection.unit,
                                         *[p.eams[r] for r in sorted(p.eams)]]}[name](policy)
    return [a.tobytes() for a in arrays]


@pytest.mark.parametrize("budget", ["10%", "40%"])
@pytest.mark.parametrize("name,options", [("lru", {}), ("lru", {"order": "recency"}), ("lfu", {}), ("deepspeed", {}),
                                          ("oracle", {}), ("oracle", {"prefetch": False}), ("oracle", {"lookahead": 2}),
                                          ("moe-infinity", {}), ("moe-infinity", {"capacity": 3})])
def test_baseline_policies_replay_in_the_loop_like_their_callbacks(name, options, budget):
    from finemoe.policies import get_policy_class
    trace = repeated_topic_trace()
    if name == "oracle":
        options = {**options, "trace": trace}
    (a, b), (looped, per_layer) = replay_both(get_policy_class(name), trace, budget, CostModel(1000, 2e5, 1e-3, 1e-4),
                                              **options)
    decode = int(trace.iterations.sum()) - trace.num_requests
    assert per_layer.looped == 0 and looped.looped >= (decode if name != "moe-infinity" else decode // 2)
    assert a["misses"] > 0
    for key in FIELDS:
        assert a[key] == b[key], key
    assert baseline_state(name, looped) == baseline_state(name, per_layer)
    if name == "moe-infinity" and not options:       # equal stored matrices: the matches tie exactly
        stored = looped.collection.unit[:looped.collection.size]
        assert len({row.tobytes() for row in stored}) < stored.shape[0]


# ---- misses computed on the CPU (--miss-compute cpu|auto): the loop splits as LayerSequence.begin does ---------
HYBRID = CostModel(1000, 2e5, 1e-3, 1e-4, cpu_expert_s=6e-3, cpu_layer_s=1e-3)   # copy 5 ms; auto splits two misses


# idle: CPU-computed experts copied for reuse into the idle copy time (layers of 10 ms: demand loads over 10 ms apart,
# over 2000 B of idle copy time per layer)
ISSUES = {"inflight": (INFLIGHT, HYBRID),
          "idle": (PrefetchIssue("idle", 256), CostModel(1000, 2e5, 1e-2, 1e-4, cpu_expert_s=6e-3, cpu_layer_s=1e-3))}


@pytest.mark.parametrize("issue", ISSUES)
@pytest.mark.parametrize("mode", ["cpu", "auto"])
@pytest.mark.parametrize("name,options", [("lru", {}), ("lfu", {}), ("deepspeed", {}), ("oracle", {"prefetch": False}),
                                          ("moe-infinity", {}), ("test-next-layer-guess", {})])
def test_cpu_computed_misses_replay_in_the_loop_like_the_layer_sequence(name, options, mode, issue):
    from finemoe.policies import get_policy_class
    trace = repeated_topic_trace()
    if name == "oracle":
        options = {**options, "trace": trace}
    rule, cost = ISSUES[issue]
    (a, b), (looped, per_layer) = replay_both(get_policy_class(name), trace, "25%", cost, miss_compute=mode,
                                              issue=rule, **options)
    assert looped.looped > 0 and per_layer.looped == 0
    assert a["cpu_experts"] > 0 and a["cpu_wait_s"] > 0
    assert a["cpu_experts"] < a["misses"] or mode == "cpu"
    if issue == "idle" and mode == "cpu":                 # copies only those of CPU-computed experts (or prefetches)
        assert a["prefetch_copies"] > 0 and a["hits"] > 0
    for key in (*FIELDS, "cpu_experts", "cpu_wait_s", "stall_s"):
        assert a[key] == b[key], key


@pytest.mark.parametrize("issue", ISSUES)
def test_finemoe_cpu_computed_misses_replay_in_the_loop_like_the_layer_sequence(issue):
    trace, embed = topic_trace(), torch.nn.Embedding(50, 8)
    rule, cost = ISSUES[issue]
    (a, b), (looped, _) = replay_both(FineMoEPolicy, trace, "15%", cost, miss_compute="auto", issue=rule, capacity=20,
                                      prefetch_distance=2, embed=embed)
    assert looped.looped > 60 and 0 < a["cpu_experts"] < a["misses"]
    for key in (*FIELDS, "cpu_experts", "cpu_wait_s", "stall_s"):
        assert a[key] == b[key], key

"""Routing replay (recorded routing in place of the router's) and the windowed rows path."""
import numpy as np
import pytest

from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine.replay import RoutingReplay
from finemoe.engine.runtime import OffloadRuntime
from finemoe.errors import ConfigError, ModelLoadError
from finemoe.models.random_shapes import build_random
from finemoe.traces.format import Trace

L, J, K = 8, 60, 4  # the built-in model's geometry
PROMPTS = ["Hello world", "The quick brown fox jumps", "MoE"]


def synthetic_trace(seed=0, prompt_lens=(5, 3), iterations=(4, 6)) -> Trace:
    rng = np.random.default_rng(seed)
    plens, iters = np.array(prompt_lens), np.array(iterations)
    offsets = np.concatenate([[0], np.cumsum(plens + iters - 1)])
    n = int(offsets[-1])
    topk = np.array([[rng.choice(J, K, replace=False) for _ in range(L)] for _ in range(n)], dtype=np.uint8)
    probs = rng.dirichlet(np.ones(J), size=(n, L)).astype(np.float16)
    return Trace("synthetic", L, J, K, offsets.astype(np.int64), plens.astype(np.int32), iters.astype(np.int32),
                 rng.integers(2, 250, n).astype(np.int32), topk, probs)


def engine(policy="lru", budget="25%"):
    return Engine.from_config(EngineConfig(policy=policy, expert_budget=budget, device="cpu", show_progress=False))


def test_replay_routes_every_layer_exactly_as_recorded():
    trace = synthetic_trace()
    eng = engine()
    replay = RoutingReplay(eng, trace)
    accessed = []
    inner = eng.policy.on_access
    eng.policy.on_access = lambda layer, experts, counts: (accessed.append((layer, tuple(experts))),
                                                            inner(layer, experts, counts))
    for r in range(trace.num_requests):
        req = replay.request_for(r, SamplingParams())
        eng.run([req])
        assert len(req.output_ids) == trace.iterations[r]           # as many iterations as recorded
    expected = []
    for r in range(trace.num_requests):
        for i in range(int(trace.iterations[r])):
            a, b = trace.iteration_rows(r, i)
            expected += [(layer, tuple(np.unique(trace.topk[a:b, layer]))) for layer in range(L)]
    assert accessed == expected


def test_replay_rejects_a_trace_of_another_geometry():
    with pytest.raises(ConfigError, match="does not match"):
        RoutingReplay(engine(), Trace("x", 2, J, K, np.array([0, 1]), np.array([1], np.int32),
                                      np.array([1], np.int32), np.array([3], np.int32),
                                      np.zeros((1, 2, K), np.uint8)))


@pytest.fixture()
def small_windows(monkeypatch):
    """Pretend grouped_mm takes at most 7 groups, so slots span several windows."""
    monkeypatch.setattr(OffloadRuntime, "max_groups", 7)


@pytest.mark.parametrize("policy,budget", [("lru", "25%"), ("lru", 4 * 98304), ("resident", None)])
def test_windowed_rows_path_keeps_outputs_exact(small_windows, policy, budget):
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    windowed = [r.output_ids for r in engine(policy, budget).generate(PROMPTS, params)]
    OffloadRuntime.max_groups = 1024
    reference = [r.output_ids for r in engine("resident", None).generate(PROMPTS, params)]
    assert windowed == reference


def test_random_shape_specs_fail_clearly():
    with pytest.raises(ModelLoadError, match="unknown random model shape 'nope'"):
        build_random("random:nope", "cpu", None)
    with pytest.raises(ModelLoadError, match="must be an integer"):
        build_random("random:qwen1.5-moe-a2.7b@x", "cpu", None)

"""The engine times its own host work by what the device does meanwhile (engine/stats.py HostTiming): per offloaded
layer before the experts are issued (the device waits) and after (the layer computes), and the policy's iteration
bracket (the device idles). The summary reports each per layer or per iteration; the simulator charges them that way
(CostModel: host_layer_s, policy_layer_s, policy_iteration_s)."""
from __future__ import annotations

import pytest

from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.models.loader import load_model
from helpers import save_tiny_checkpoint

KEYS = ("host_before_compute_ms_per_layer", "host_after_compute_ms_per_layer", "host_policy_ms_per_iteration")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen") / "qwen2_moe")


def serve(qwen, policy: str, budget: str) -> Engine:
    cfg = EngineConfig(model=str(qwen), device="cpu", expert_budget=budget, policy=policy, warm_up=False,
                       show_progress=False)
    engine = Engine(load_model(cfg), cfg)
    engine.generate(["Hello there", "a"], SamplingParams(max_new_tokens=4, ignore_eos=True))
    return engine


@pytest.mark.parametrize("policy", ["lru", "finemoe"])
def test_every_offloaded_layer_and_iteration_is_timed(qwen, policy):
    engine = serve(qwen, policy, "25%")
    host, totals = engine.runtime.totals.host, engine.runtime.totals
    assert host.iterations == totals.iterations > 0
    assert host.layers == totals.iterations * engine.geometry.num_layers     # every layer of every iteration
    s = engine.summary([])
    assert all(s[k] >= 0 for k in KEYS) and s["host_after_compute_ms_per_layer"] > 0
    if policy == "finemoe":   # its iteration start searches the map store: host work between iterations
        assert s["host_policy_ms_per_iteration"] > 0


def test_resident_has_no_per_layer_host_work(qwen):
    engine = serve(qwen, "resident", "100%")
    assert engine.runtime.totals.host.layers == 0
    assert engine.summary([])["host_before_compute_ms_per_layer"] == 0.0


def test_each_part_is_timed_where_the_policy_works(qwen, monkeypatch):
    """On a fake clock that only the policy's callbacks advance, each report is exactly what they took: on_access
    before the layer's experts, on_layer_routed beside them, on_iteration_start between iterations."""
    from types import SimpleNamespace

    from finemoe.engine import runtime
    clock = [0.0]
    monkeypatch.setattr(runtime, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    cfg = EngineConfig(model=str(qwen), device="cpu", expert_budget="25%", policy="lru", warm_up=False,
                       show_progress=False)
    engine = Engine(load_model(cfg), cfg)
    policy = engine.runtime.policy

    def taking(fn, seconds):
        def timed(*args):
            clock[0] += seconds
            return fn(*args)
        return timed

    monkeypatch.setattr(policy, "on_access", taking(policy.on_access, 0.001))
    monkeypatch.setattr(policy, "on_layer_routed", taking(policy.on_layer_routed, 0.002))
    monkeypatch.setattr(policy, "on_iteration_start", taking(policy.on_iteration_start, 0.003))
    engine.generate(["Hello there"], SamplingParams(max_new_tokens=3, ignore_eos=True))
    s = engine.summary([])
    assert s["host_before_compute_ms_per_layer"] == pytest.approx(1.0)
    assert s["host_after_compute_ms_per_layer"] == pytest.approx(2.0)
    assert s["host_policy_ms_per_iteration"] == pytest.approx(3.0)

"""The trace-driven simulator: its cost model, hand-computed timings, what it refuses, its CLI, and
agreement with the engine's own hit/miss/byte counts on the trained reference model."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import require_shared
from finemoe import EngineConfig
from finemoe.cli.main import main
from finemoe.engine import Engine, SamplingParams
from finemoe.errors import ConfigError
from finemoe.experts.miss_split import MODES, MissCosts
from finemoe.simulator import CostModel, Replay, SimulationError, TimedTransport, simulate
from finemoe.traces import Trace


def test_copies_run_one_after_another_and_a_wait_stalls_until_the_copy_lands():
    t = TimedTransport(3, CostModel(expert_bytes=4, bandwidth_Bps=2.0, layer_time_s=5.0))     # 2 s per copy
    t.copy(np.array([0, 1]), np.array([10, 11]))
    assert t.state.done_at[:2].tolist() == [2.0, 4.0] and t.bytes_copied == 8
    t.advance(3.0)
    assert t.finished(np.array([0, 1])).tolist() == [True, False]
    hit = t.load(np.array([0, 1]), np.array([10, 11]), np.zeros(2, bool))   # slot 1's copy is still in flight
    assert hit.tolist() == [True, False]
    assert t.now == 4.0 and t.drain_stall_seconds() == 1.0
    t.used(np.array([2]))                                                   # read by a compute until 4 + 5
    hit = t.load(np.array([2]), np.array([12]), np.ones(1, bool))           # engine idle, but slot 2 is read
    assert hit.tolist() == [False] and t.state.done_at[2] == 11.0 and t.now == 11.0


def two_layer_trace() -> Trace:
    """One request, 2 layers, top-1: iteration 0 uses experts (0, 1), iteration 1 uses (0, 2)."""
    topk = np.array([[[0], [1]], [[0], [2]]])
    return Trace("hand", 2, 4, 1, offsets=np.array([0, 2]), prompt_lens=np.array([1]), iterations=np.array([2]),
                 token_ids=np.array([7, 8]), topk=topk)


def test_hand_computed_ttft_and_tpot_for_on_demand_and_for_prefetching():
    cost = CostModel(expert_bytes=1, bandwidth_Bps=1.0, layer_time_s=0.5)    # 1 s per copy, 0.5 s per layer
    lru, oracle = simulate(two_layer_trace(), ["lru", "oracle"], [4], cost)
    # lru: miss e0 (stall 1) +0.5, miss e1 (1.5 -> 2.5) +0.5 -> TTFT 3.0; hit e0 +0.5, miss e2 +1 +0.5 -> 5.0
    assert (lru["ttft_s"], lru["tpot_s"], lru["hits"], lru["misses"], lru["bytes_copied"]) == (3.0, 2.0, 1, 3, 3)
    # oracle prefetches both layers at iteration start: copies land at 1 and 2 -> TTFT 2.5;
    # at 2.5 it prefetches e2 (lands 3.5) while layer 0 computes on a hit -> 4.0, TPOT 1.5
    assert (oracle["ttft_s"], oracle["tpot_s"], oracle["hits"], oracle["misses"]) == (2.5, 1.5, 1, 3)
    assert oracle["prefetch_copies"] == 3


def test_host_round_trip_delays_every_offloaded_layer_and_its_copies():
    cost = CostModel(expert_bytes=1, bandwidth_Bps=1.0, layer_time_s=0.5, host_layer_s=0.25)
    lru, resident = simulate(two_layer_trace(), ["lru", "resident"], ["100%"], cost)
    # lru (all 8 slots): +0.25 host, miss e0 (1.25) +0.5; +0.25, miss e1 (2.0 -> 3.0) +0.5 -> TTFT 3.5;
    # +0.25 hit e0 +0.5 (4.25); +0.25 miss e2 (4.5 -> 5.5) +0.5 -> 6.0, TPOT 2.5
    assert (lru["ttft_s"], lru["tpot_s"]) == (3.5, 2.5)
    assert (resident["ttft_s"], resident["tpot_s"]) == (1.0, 1.0)   # no routing round trip when all is resident


def test_policy_host_time_longer_than_the_layer_delays_the_next_layer():
    cost = CostModel(expert_bytes=1, bandwidth_Bps=float("inf"), layer_time_s=0.5, policy_layer_s=0.75)
    lru, resident = simulate(two_layer_trace(), ["lru", "resident"], ["100%"], cost)
    assert (lru["ttft_s"], lru["tpot_s"]) == (1.5, 1.5)            # free copies: 2 layers x max(0.5, 0.75)
    assert (resident["ttft_s"], resident["tpot_s"]) == (1.0, 1.0)  # no policy work when all is resident
    shorter = simulate(two_layer_trace(), ["lru"], ["100%"], dataclasses.replace(cost, policy_layer_s=0.25))[0]
    assert (shorter["ttft_s"], shorter["tpot_s"]) == (1.0, 1.0)    # hidden under the layer's compute


def test_policy_iteration_time_is_serial_once_per_iteration():
    """The policy's iteration start and end run while the device idles between iterations: never hidden."""
    cost = CostModel(expert_bytes=1, bandwidth_Bps=float("inf"), layer_time_s=0.5, policy_iteration_s=0.25)
    lru, resident = simulate(two_layer_trace(), ["lru", "resident"], ["100%"], cost)
    assert (lru["ttft_s"], lru["tpot_s"]) == (1.25, 1.25)          # 0.25 + 2 layers x 0.5, per iteration
    assert (resident["ttft_s"], resident["tpot_s"]) == (1.0, 1.0)  # no policy work when all is resident
    with pytest.raises(ConfigError, match="per iteration"):
        CostModel(expert_bytes=1, policy_iteration_s=-1.0)


@pytest.mark.parametrize("policy", ["mixtral-offloading", "promoe"])
def test_policies_that_need_hidden_states_are_refused_with_the_fix(policy):
    with pytest.raises(SimulationError, match="run it in the engine"):
        simulate(two_layer_trace(), [policy], [4], CostModel(expert_bytes=1))


def test_a_policy_needing_router_probs_is_refused_on_a_trace_without_them():
    with pytest.raises(SimulationError, match="probabilities"):
        simulate(two_layer_trace(), ["record"], [4], CostModel(expert_bytes=1))


def test_simulate_cli_prints_one_json_row_per_policy_and_budget(tmp_path, capsys):
    path = tmp_path / "t.safetensors"
    two_layer_trace().save(str(path))
    rc = main(["simulate", "--trace", str(path), "--policy", "lru,oracle", "--expert-budget", "2000,4000",
               "--expert-bytes", "1000", "--bandwidth", "inf", "--json"])
    rows = json.loads(capsys.readouterr().out)["results"]
    assert rc == 0 and [(r["policy"], r["expert_budget_bytes"]) for r in rows] == \
        [("lru", 2000), ("lru", 4000), ("oracle", 2000), ("oracle", 4000)]
    for key in ("hits", "misses", "hit_rate", "bytes_copied", "bytes_per_token", "ttft_s", "tpot_s"):
        assert all(key in r for r in rows)


def test_simulate_cli_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "t.safetensors"
    two_layer_trace().save(str(path))
    assert main(["simulate", "--trace", str(path), "--policy", "promoe", "--expert-bytes", "1"]) == 2
    assert "cannot be simulated" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(path), "--policy", "lru"]) == 2     # trace has no expert size
    assert "--expert-bytes" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(path), "--policy", "lru", "--expert-bytes", "1",
                 "--bandwidth", "48.4e9"]) == 2                                 # B/s passed as GB/s
    assert "not B/s" in capsys.readouterr().err


# ---- agreement with the engine on the trained reference model ----------------------------------------
PROMPT_TOKENS, MAX_NEW = 40, 6


@pytest.fixture(scope="module")
def ref_setup(ref_moe_dir):
    path = require_shared("data", "prompts", "lmsys_chat_64.jsonl")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:3]]
    cfg = dict(model=str(ref_moe_dir), device="cpu", show_progress=False, max_batch_size=1)
    engine = Engine.from_config(EngineConfig(policy="record", **cfg))
    prompts = [engine.tokenizer(f"User: {r['prompt']}\n\nAssistant:", add_special_tokens=False)["input_ids"]
               [:PROMPT_TOKENS] for r in records]
    engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    trace = engine.policy.to_trace(engine.model_name, engine.geometry.expert_bytes)
    return cfg, prompts, trace


@pytest.mark.parametrize("policy,budget", [("lru", "25%"), ("lru", "4%"), ("lfu", "4%"), ("oracle", "4%")])
def test_simulator_counts_equal_the_engines_on_ref_moe(ref_setup, policy, budget):
    cfg, prompts, trace = ref_setup
    options = {"trace": trace} if policy == "oracle" else {}
    engine = Engine.from_config(EngineConfig(policy=policy, policy_options=options, expert_budget=budget, **cfg))
    summary = engine.summary(engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)))
    engine.close()
    (sim,) = simulate(trace, [policy], [budget], CostModel(trace.expert_bytes, float("inf")))
    assert sim["expert_budget_bytes"] == summary["expert_budget_bytes"]
    assert (sim["hits"], sim["misses"], sim["bytes_copied"]) == \
        (summary["hits"], summary["misses"], summary["bytes_copied"])
    assert summary["misses"] > 0


# the same miss costs in the engine and the simulator: exact binary fractions, so both split every layer alike
HYBRID_COSTS = MissCosts(copy_s=1.0, cpu_s=1.0, cpu_token_s=0.5, cpu_fixed_s=0.25)


@pytest.mark.parametrize("issue", ["inflight", "idle"])
@pytest.mark.parametrize("policy,budget", [("lru", "25%"), ("oracle", "4%")])
def test_simulator_splits_misses_like_the_engine_in_every_mode(ref_setup, policy, budget, issue):
    """Each request's hits, misses, bytes and CPU-computed experts, engine against simulator, per --miss-compute and
    --prefetch-issue (idle: CPU-computed experts are copied for reuse at the next iteration's start)."""
    cfg, prompts, trace = ref_setup
    options = {"trace": trace} if policy == "oracle" else {}
    engine = Engine.from_config(EngineConfig(policy=policy, policy_options=options, expert_budget=budget,
                                             prefetch_issue=issue, **cfg))
    cpu_experts, hits = {}, {}
    for mode in MODES:
        engine.reconfigure(policy, budget, options, miss_compute=mode, miss_costs=HYBRID_COSTS)
        served = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
        replay = Replay(trace, policy, budget, CostModel(trace.expert_bytes, float("inf")), options,
                        miss_compute=mode, miss_costs=HYBRID_COSTS, issue=engine.cfg.issue)
        replay.run()
        want = [(r.metrics.hits, r.metrics.misses, int(r.metrics.bytes_copied), r.metrics.cpu_experts) for r in served]
        got = [(m.hits, m.misses, int(m.bytes_copied), m.cpu_experts) for m in replay.metrics]
        assert got == want, mode
        cpu_experts[mode] = sum(m[3] for m in want)
        hits[mode] = sum(m[0] for m in want)
    engine.close()
    assert cpu_experts["gpu"] == 0 and 0 < cpu_experts["auto"] < cpu_experts["cpu"]
    if policy == "lru":       # no policy prefetch: in cpu mode only a CPU-computed expert's copy makes a hit
        assert (hits["cpu"] > 0) == (issue == "idle")

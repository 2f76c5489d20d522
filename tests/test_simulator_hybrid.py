"""The simulator's CPU execution of misses (`--miss-compute cpu|auto`): hand-computed times of the CPU half beside
the copies, the split the engine makes, the cost flags of `simulate` and `bench --simulate` and their errors, and
`finemoe tune` (its recommendation, its JSON, its errors)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from finemoe.cli.main import main
from finemoe.experts.prefetch_issue import PrefetchIssue
from finemoe.simulator import CostModel, simulate
from finemoe.policies import get_policy_class
from finemoe.simulator.tuning import recommend
from finemoe.traces import Trace
from helpers import topic_trace
from test_decode_loop import replay_both


def one_layer_trace(prompt_experts, decode_experts) -> Trace:
    """One request, 1 layer, top-2: the prompt's rows route to prompt_experts [T, 2], then one decode token."""
    topk = np.array([[row] for row in [*prompt_experts, decode_experts]])              # [T + 1, 1, 2]
    T = len(prompt_experts)
    return Trace("hand", 1, 8, 2, offsets=np.array([0, T + 1]), prompt_lens=np.array([T]), iterations=np.array([2]),
                 token_ids=np.arange(T + 1), topk=topk)


def run(trace, mode, budget=8, **cost):
    (row,) = simulate(trace, ["lru"], [budget], CostModel(expert_bytes=1, bandwidth_Bps=1.0, **cost),
                      miss_compute=mode)
    return row


def test_cpu_mode_computes_every_miss_on_the_cpu_with_its_round_trip():
    # prompt: experts 0, 1 (one token); decode: 2, 3. copy 1 s; CPU 0.75 s/expert + 0.25 s/layer; layer 0.5 s
    trace = one_layer_trace([[0, 1]], [2, 3])
    row = run(trace, "cpu", layer_time_s=0.5, cpu_expert_s=0.75, cpu_layer_s=0.25)
    # each iteration: CPU half 0.25 + 2 * 0.75 = 1.75, then the layer 0.5
    assert (row["ttft_s"], row["tpot_s"]) == (2.25, 2.25)
    assert (row["hits"], row["misses"], row["cpu_experts"], row["bytes_copied"]) == (0, 4, 4, 0)
    assert row["cpu_wait_s"] == row["stall_s"] == 3.5


def test_auto_runs_the_cpu_half_beside_the_copies_and_waits_for_the_slower():
    trace = one_layer_trace([[0, 1]], [2, 3])
    gpu = run(trace, "gpu", layer_time_s=0.5)
    assert gpu["ttft_s"] == 2.5                                    # two copies one after another, then the layer
    fast_cpu = run(trace, "auto", layer_time_s=0.5, cpu_expert_s=0.75)
    # one expert copied (1 s) while the other computes on the CPU (0.75 s): the copy is the slower half
    assert (fast_cpu["ttft_s"], fast_cpu["cpu_experts"], fast_cpu["bytes_copied"]) == (1.5, 2, 2)
    assert fast_cpu["cpu_wait_s"] == 0.0 and fast_cpu["stall_s"] == 2.0
    slow_cpu = run(trace, "auto", layer_time_s=0.5, cpu_expert_s=1.25)
    # the CPU half (1.25 s) outlasts the copy (1 s): 0.25 s of CPU wait per iteration
    assert (slow_cpu["ttft_s"], slow_cpu["cpu_experts"]) == (1.75, 2)
    assert slow_cpu["cpu_wait_s"] == 0.5 and slow_cpu["stall_s"] == 2.5
    too_slow = run(trace, "auto", layer_time_s=0.5, cpu_expert_s=2.5)
    assert (too_slow["ttft_s"], too_slow["cpu_experts"], too_slow["bytes_copied"]) == (2.5, 0, 4)


def test_a_hybrid_layer_takes_the_engines_captured_timeline_in_the_loop_and_the_per_layer_path():
    # Two layers, top-2; every routed expert is new, so every expert misses: the prompt's one token routes to experts
    # 0, 1 in both layers, the decode token to 2, 3. Copy 1 s; CPU half 0.25 s + 1.5 s per expert; host round trip
    # 0.5 s; layer 2 s. auto puts one of a layer's two misses on the CPU: max(1.75, 1) beats two copies (2 s).
    topk = np.array([[[0, 1], [0, 1]], [[2, 3], [2, 3]]])                              # [T=2, L=2, k=2]
    trace = Trace("hand", 2, 8, 2, offsets=np.array([0, 2]), prompt_lens=np.array([1]), iterations=np.array([2]),
                  token_ids=np.arange(2), topk=topk)
    cost = CostModel(expert_bytes=1, bandwidth_Bps=1.0, layer_time_s=2.0, host_layer_s=0.5, cpu_expert_s=1.5,
                     cpu_layer_s=0.25)
    # The engine's captured decode path, per layer (engine/graphs.py, runtime.begin_replayed_layer,
    # cpu_misses.run_static), from the previous layer's compute end t:
    #   host thread   routing sync and cache work: t + 0.5 (R); then the CPU half, R .. R + 1.75; then the replay
    #   copy engine   the device half's one copy, R .. R + 1
    #   device        the segment (device half's experts, the CPU result's add, the rest): R + 1.75 .. R + 3.75
    layer = 0.5 + max(0.25 + 1.5, 1.0) + 2.0                                            # 4.25 s, not 0.5 + 1 + 2
    (looped, per_layer), (policy, _) = replay_both(get_policy_class("lru"), trace, "100%", cost, miss_compute="auto")
    assert policy.looped == 2                           # both one-token iterations ran in the compiled loop
    for row in (looped, per_layer):
        assert (row["ttft_s"], row["tpot_s"]) == (2 * layer, 2 * layer)
        assert (row["cpu_experts"], row["bytes_copied"]) == (4, 4)
        assert row["cpu_wait_s"] == 4 * (1.75 - 1.0)   # beyond each layer's copy
        assert row["stall_s"] == 4 * 1.75               # the compute waited for the CPU half, behind which the copy ran
    (gpu,) = simulate(trace, ["lru"], ["100%"], cost)   # gpu mode: both copies, one after the other
    assert gpu["tpot_s"] == 2 * (0.5 + 2 * 1.0 + 2.0) and gpu["cpu_experts"] == 0


@pytest.mark.parametrize("issue", ["inflight", "idle"])
def test_an_expert_computed_on_the_cpu_is_resident_in_the_next_iteration_only_under_idle(issue):
    # prompt and decode token both route to experts 0, 1; copies are free; every miss runs on the CPU
    trace = one_layer_trace([[0, 1]], [0, 1])
    (row,) = simulate(trace, ["lru"], [8], CostModel(expert_bytes=1, bandwidth_Bps=float("inf"), cpu_expert_s=1.0),
                      miss_compute="cpu", issue=PrefetchIssue(issue, 256))
    if issue == "idle":    # copied as prefetches at the decode iteration's start: hits there
        assert (row["hits"], row["misses"], row["cpu_experts"], row["bytes_copied"]) == (2, 2, 2, 2)
        assert (row["prefetch_copies"], row["wasted_prefetches"]) == (2, 0)
    else:                  # never copied: missed and computed on the CPU again
        assert (row["hits"], row["misses"], row["cpu_experts"], row["bytes_copied"]) == (0, 4, 4, 0)
        assert row["prefetch_copies"] == 0


def test_the_cpu_half_starts_after_the_host_round_trip_like_the_copies():
    trace = one_layer_trace([[0, 1]], [2, 3])
    row = run(trace, "cpu", host_layer_s=0.5, cpu_expert_s=1.0)
    assert (row["ttft_s"], row["tpot_s"]) == (2.5, 2.5)


def test_prefill_experts_with_more_tokens_cost_more_on_the_cpu_and_stay_on_the_device():
    # prompt of 3 tokens: expert 0 in every row (3 tokens), experts 1, 2, 3 once each
    trace = one_layer_trace([[0, 1], [0, 2], [0, 3]], [4, 5])
    cpu = run(trace, "cpu", cpu_expert_s=0.5, cpu_token_s=0.25)
    assert cpu["ttft_s"] == 4 * 0.5 + 2 * 0.25                     # expert 0's 2 further tokens
    auto = run(trace, "auto", cpu_expert_s=0.5, cpu_token_s=2.0)
    # 4 misses, copy 1 s each: the 3 one-token experts on the CPU (1.5 s) beside expert 0's copy (1 s)
    assert (auto["ttft_s"], auto["bytes_copied"]) == (1.5, 1 + 1)  # + the decode token's one copied expert


def test_gpu_mode_ignores_the_cpu_costs():
    trace = topic_trace()
    cost = CostModel(1000, 1e6, 1e-3, 1e-4)
    (plain,) = simulate(trace, ["lru"], ["25%"], cost)
    (gpu,) = simulate(trace, ["lru"], ["25%"], CostModel(1000, 1e6, 1e-3, 1e-4, cpu_expert_s=1e-4), miss_compute="gpu")
    assert plain == {**gpu, "wall_s": plain["wall_s"], "requests_per_s": plain["requests_per_s"]}
    assert gpu["cpu_experts"] == 0


# ---- `finemoe simulate` / `bench --simulate` flags -----------------------------------------------------
@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "t.safetensors"
    topic_trace().save(str(path))
    return str(path)


def test_simulate_cli_takes_the_cpu_costs(trace_file, capsys):
    base = ["simulate", "--trace", trace_file, "--expert-budget", "25%", "--bandwidth", "0.001", "--json"]
    assert main([*base, "--miss-compute", "auto", "--cpu-expert-ms", "0.7", "--cpu-layer-ms", "0.1"]) == 0
    (auto,) = json.loads(capsys.readouterr().out)["results"]
    assert main(base) == 0
    (gpu,) = json.loads(capsys.readouterr().out)["results"]
    assert 0 < auto["cpu_experts"] < auto["misses"] and gpu["cpu_experts"] == 0
    # prefill's many misses split between the two ways; decode pays for experts computed on the CPU and so never
    # cached (a CPU-computed expert is not copied afterwards yet)
    assert auto["bytes_copied"] < gpu["bytes_copied"] and auto["ttft_s"] < gpu["ttft_s"]


@pytest.mark.parametrize("flags,message", [
    (["--miss-compute", "cpu"], "--miss-compute cpu needs --cpu-expert-ms MS"),
    (["--miss-compute", "fast", "--cpu-expert-ms", "1"], "--miss-compute 'fast' is not a mode"),
    (["--miss-compute", "auto", "--cpu-expert-ms", "0"], "--cpu-expert-ms 0 must be a finite number of ms"),
    (["--miss-compute", "auto", "--cpu-expert-ms", "-1"], "--cpu-expert-ms -1 must be a finite"),
    (["--miss-compute", "auto", "--cpu-expert-ms", "nan"], "--cpu-expert-ms nan must be a finite"),
    (["--miss-compute", "auto", "--cpu-expert-ms", "fast"], "--cpu-expert-ms 'fast' is not a number of milliseconds"),
    (["--miss-compute", "auto", "--cpu-expert-ms", "1", "--cpu-token-ms", "-0.5"], "--cpu-token-ms -0.5 must be"),
    (["--miss-compute", "auto", "--cpu-expert-ms", "1", "--cpu-layer-ms", "inf"], "--cpu-layer-ms inf must be"),
])
@pytest.mark.parametrize("command", ["simulate", "tune"])
def test_bad_cpu_cost_flags_fail_in_one_line(trace_file, capsys, command, flags, message):
    assert main([command, "--trace", trace_file, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith(f"finemoe: error: {message}")


def test_bench_simulate_replays_in_the_miss_compute_mode(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello there", "a poem", "a joke", "why"]))
    rows = {}
    for mode in ("gpu", "cpu"):
        out = tmp_path / mode
        assert main(["bench", "--prompts", str(prompts), "--max-new-tokens", "3", "--max-prompt-tokens", "16",
                     "--device", "cpu", "--split", "0.5", "--out", str(out), "--json", "--simulate", "--policies",
                     "lru", "--expert-bytes", "1000000", "--bandwidth", "10", "--miss-compute", mode,
                     "--cpu-expert-ms", "0.05"]) == 0
        (rows[mode],) = json.loads(capsys.readouterr().out)["results"]
        meta = json.loads((out / "summary.json").read_text())["meta"]
        assert meta["miss_compute"] == mode and meta["miss_costs"]["cpu_s"] == 5e-5
    cpu, gpu = rows["cpu"], rows["gpu"]
    assert cpu["cpu_experts"] == cpu["misses"] == gpu["hits"] + gpu["misses"] > 0        # nothing is ever cached
    assert cpu["bytes_copied"] == 0 and gpu["cpu_experts"] == 0


# ---- `finemoe tune` ----------------------------------------------------------------------------------
def test_recommend_takes_the_lowest_tpot_per_budget_and_overall():
    rows = [{"expert_budget": b, "policy": p, "tpot_s": t} for b, p, t in
            [("10%", "lru", 3.0), ("10%", "lfu", 2.0), ("10%", "x", float("nan")), ("50%", "lru", 1.0),
             ("50%", "lfu", 1.0)]]
    per_budget, best = recommend(rows)
    assert per_budget == {"10%": rows[1], "50%": rows[3]} and best is rows[3]


def test_tune_prints_the_grid_and_recommends_its_lowest_tpot_row(trace_file, capsys):
    t0 = time.perf_counter()
    assert main(["tune", "--trace", trace_file, "--bandwidth", "0.001", "--layer-time-ms", "0.5",
                 "--cpu-expert-ms", "0.7", "--cpu-layer-ms", "0.1", "--json"]) == 0
    assert time.perf_counter() - t0 < 30
    out = json.loads(capsys.readouterr().out)
    rows, rec = out["results"], out["recommended"]
    assert {r["expert_budget"] for r in rows} == {"10%", "25%", "50%"}
    assert {r["miss_compute"] for r in rows} == {"gpu", "cpu", "auto"}
    policies = {r["policy"] for r in rows}
    assert {"lru", "lfu", "deepspeed", "moe-infinity"} <= policies and not policies & {"oracle", "resident", "record"}
    assert len(rows) == 3 * 3 * len(policies)
    assert rec["best"] == min(rows, key=lambda r: r["tpot_s"])
    for budget, row in rec["per_budget"].items():
        assert row == min((r for r in rows if r["expert_budget"] == budget), key=lambda r: r["tpot_s"])
    assert main(["tune", "--trace", trace_file, "--bandwidth", "0.001", "--policy", "lru,lfu", "--expert-budget",
                 "25%", "--cpu-expert-ms", "0.7"]) == 0
    text = capsys.readouterr().out
    assert "recommended (lowest predicted TPOT)" in text and "best: --expert-budget 25% --policy" in text


def test_tune_without_cpu_costs_tunes_gpu_mode_only(trace_file, capsys):
    assert main(["tune", "--trace", trace_file, "--policy", "lru", "--expert-budget", "25%", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [(r["policy"], r["miss_compute"]) for r in rows] == [("lru", "gpu")]


def test_tune_compares_prefetch_issue_rules_and_simulate_reads_the_recorded_embedding(trace_file, tmp_path, capsys):
    assert main(["tune", "--trace", trace_file, "--policy", "lru,moe-infinity", "--expert-budget", "25%",
                 "--bandwidth", "0.001", "--layer-time-ms", "0.5", "--prefetch-issue", "inflight,idle", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [(r["policy"], r["prefetch_issue"]) for r in rows] == [
        ("lru", "inflight"), ("lru", "idle"), ("moe-infinity", "inflight"), ("moe-infinity", "idle")]
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"model.embed_tokens.weight": torch.randn(50, 8)}, str(folder / "model.safetensors"))
    assert main(["simulate", "--trace", trace_file, "--policy", "finemoe", "--embed-from", str(folder),
                 "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["results"]
    assert row["policy"] == "finemoe" and row["hits"] > 0
    assert main(["simulate", "--trace", trace_file, "--prefetch-issue", "inflight,idle"]) == 2
    assert "`finemoe tune` compares several" in capsys.readouterr().err


def test_tune_leaves_out_a_default_policy_that_cannot_run_and_says_why(trace_file, capsys):
    token = ["--policy-option", "finemoe:semantic=token"]     # this trace holds no input embedding
    assert main(["tune", "--trace", trace_file, "--expert-budget", "25%", "--json", *token]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    ran = {r["policy"] for r in result["results"]}
    assert "finemoe" not in ran and "lru" in ran
    assert "input embedding" in result["skipped"]["finemoe"] and "finemoe left out" in out.err
    assert main(["tune", "--trace", trace_file, "--policy", "finemoe", *token]) == 2   # named: its error, one line
    assert "input embedding" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--policy", "promoe"], "policy 'promoe' applies later layers' routers"),
    (["--policy", "nope"], "unknown policy"),
    (["--expert-budget", ","], "--expert-budget is empty"),
    (["--miss-compute", "gpu,fast"], "--miss-compute 'fast' is not a mode"),
    (["--bandwidth", "-3"], "--bandwidth must be positive"),
    (["--prefetch-inflight", "0"], "--prefetch-inflight must be >= 1"),
])
def test_tune_errors_are_one_line(trace_file, capsys, flags, message):
    assert main(["tune", "--trace", trace_file, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and message in err

"""`--miss-compute cpu|auto`: missed experts computed on the host CPU (engine/cpu_misses.py) give the device
path's result within fp32 tolerance for every architecture, batch 1 and 3; `auto` splits as its cost model says
and the engine's counts follow; calibration measures positive finite costs; bad flag values fail in one line.

All on the CPU device in fp32, where `gpu` mode is exact (tests/test_architectures.py), so it is the reference.
"""
from __future__ import annotations

import json

import pytest
import torch

from finemoe import EngineConfig
from finemoe.cli.main import main
from finemoe.engine import Engine, SamplingParams, miss_choice
from finemoe.experts.miss_split import MissCosts
from finemoe.models.loader import load_model
from helpers import LogitsEngine, CONFIGS, TOP_K, save_tiny_checkpoint

PROMPTS = ["Hello", "The quick brown fox", "a"]     # batch 3: rows of different lengths, left-padded
MAX_NEW = 5
COPY_CHEAP = MissCosts(copy_s=0.0, cpu_s=1.0)       # auto keeps every miss on the device
CPU_CHEAP = MissCosts(copy_s=1.0, cpu_s=0.0)        # auto computes every miss on the CPU
EVEN = MissCosts(copy_s=1.0, cpu_s=1.0)             # auto splits a layer's misses about in half


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return save_tiny_checkpoint(request.param, tmp_path_factory.mktemp("ckpt") / request.param)


def engine_for(ckpt, budget="25%", policy="lru") -> LogitsEngine:
    cfg = EngineConfig(model=str(ckpt), device="cpu", expert_budget=budget, policy=policy, show_progress=False)
    return LogitsEngine(load_model(cfg), cfg)


def run(engine: LogitsEngine, mode: str, costs: MissCosts | None, prompts: list[str], budget="25%"):
    """Serve `prompts` from a cold cache in `mode` -> (tokens per request, logits per iteration, requests)."""
    engine.reconfigure("lru", budget, miss_compute=mode, miss_costs=costs)
    engine.logits.clear()
    reqs = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    return [r.output_ids for r in reqs], list(engine.logits), reqs


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[1:2]], ids=["batch3", "batch1"])
@pytest.mark.parametrize("mode,costs", [("cpu", None), ("auto", EVEN)], ids=["cpu", "auto-split"])
def test_cpu_computed_misses_match_the_device_path(checkpoint, prompts, mode, costs):
    engine = engine_for(checkpoint)
    want_tokens, want_logits, _ = run(engine, "gpu", None, prompts)
    tokens, logits, reqs = run(engine, mode, costs or EVEN, prompts)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    t = engine.runtime.totals
    assert 0 < t.cpu_experts <= t.misses.sum()
    if len(prompts) == 1:
        assert reqs[0].metrics.cpu_experts == t.cpu_experts
    if mode == "cpu":
        assert t.cpu_experts == t.misses.sum() and t.bytes_copied == 0 and t.hits.sum() == 0
    else:
        assert t.cpu_experts < t.misses.sum()
        assert t.bytes_copied == (t.misses.sum() - t.cpu_experts) * engine.geometry.expert_bytes


def test_cpu_half_next_to_waves_matches(checkpoint):
    """The smallest budget (one layer's top-k slots): batch 3's layers run in waves beside the CPU half."""
    budget = engine_for(checkpoint).geometry.expert_bytes * TOP_K
    engine = engine_for(checkpoint, budget)
    want_tokens, want_logits, _ = run(engine, "gpu", None, PROMPTS, budget)
    tokens, logits, _ = run(engine, "auto", EVEN, PROMPTS, budget)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert 0 < engine.runtime.totals.cpu_experts


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen") / "qwen2_moe")


def counts(engine: Engine) -> tuple[int, int, int, int]:
    t = engine.runtime.totals
    return int(t.hits.sum()), int(t.misses.sum()), int(t.bytes_copied), int(t.cpu_experts)


def test_auto_with_cheap_copies_is_gpu_mode_exactly(qwen):
    engine = engine_for(qwen)
    want_tokens, want_logits, _ = run(engine, "gpu", None, PROMPTS)
    gpu_counts = counts(engine)
    tokens, logits, reqs = run(engine, "auto", COPY_CHEAP, PROMPTS)
    assert tokens == want_tokens and all(torch.equal(a, b) for a, b in zip(logits, want_logits, strict=True))
    assert counts(engine) == gpu_counts and gpu_counts[3] == 0
    assert all(r.metrics.cpu_experts == 0 for r in reqs)


def test_auto_with_a_cheap_cpu_computes_every_miss_there(qwen):
    engine = engine_for(qwen)
    run(engine, "gpu", None, PROMPTS)
    gpu_hits, gpu_misses, _, _ = counts(engine)
    _, _, reqs = run(engine, "auto", CPU_CHEAP, PROMPTS)
    hits, misses, copied, cpu = counts(engine)
    assert (hits, copied) == (0, 0) and cpu == misses == gpu_hits + gpu_misses   # nothing is ever copied
    assert all(r.metrics.cpu_experts == r.metrics.misses > 0 for r in reqs)


def test_auto_splits_each_layer_as_the_cost_model_says(qwen):
    """EVEN: every miss costs 1 s either way, so of a layer's n one-token misses the CPU takes the m minimising
    max(n - m, m): half of them (ties go to the device). Here 3 tokens route to 6 distinct cold experts."""
    engine = engine_for(qwen)
    engine.reconfigure("lru", "25%", miss_compute="auto", miss_costs=EVEN)
    rt = engine.runtime
    step = rt.begin_layer(0, torch.tensor([[0, 1], [2, 3], [4, 5]]))
    assert step.demand.cpu.size == 3 and step.experts.size == 3        # 6 misses of 1 token: 3 copies, 3 on CPU
    assert set(step.demand.cpu.tolist()) | set(step.experts.tolist()) == set(range(6))
    rt.finish_layer(step)


def test_calibration_measures_positive_finite_costs(qwen):
    engine = engine_for(qwen)
    engine.reconfigure("lru", "25%", miss_compute="auto")
    c = engine.miss_costs
    assert all(v > 0 and v < 1 for v in (c.copy_s, c.cpu_s, c.cpu_fixed_s))
    assert 0 <= c.cpu_token_s < 1
    report = engine.miss_compute_report()
    assert report["miss_compute"] == "auto" and report["cpu_threads"] == torch.get_num_threads()
    assert report["cpu_expert_dtype"] == "float32"          # an fp32 model: the only candidate


@pytest.mark.parametrize("choice", ["auto", "model", "float32"])
def test_cpu_expert_dtype_of_a_bf16_model(qwen, choice):
    """bf16 weights: the CPU half reads the host store itself (model), a float32 copy of it (float32), or whichever
    of the two calibration measured faster at one token (auto). Either way it agrees with the device path at bf16
    precision, and its results come back in the model's dtype."""
    cfg = EngineConfig(model=str(qwen), device="cpu", dtype="bfloat16", expert_budget="25%", show_progress=False,
                       cpu_expert_dtype=choice)
    engine = LogitsEngine(load_model(cfg), cfg)
    want_tokens, want_logits, _ = run(engine, "gpu", None, PROMPTS[1:2])
    engine.reconfigure("lru", "25%", miss_compute="cpu")
    cal = engine.calibration
    assert set(cal.cpu_s_by_dtype) == {"auto": {"bfloat16", "float32"}, "model": {"bfloat16"},
                                       "float32": {"float32"}}[choice]
    if choice == "auto":
        fastest = min(cal.cpu_s_by_dtype, key=lambda d: cal.cpu_s_by_dtype[d][1])
        assert str(cal.cpu_dtype) == f"torch.{fastest}"
    kernel = engine.runtime.cpu_misses.kernel
    assert kernel.dtype == cal.cpu_dtype and cal.kernel == "torch"
    assert all(t.dtype == cal.cpu_dtype for t in kernel.views[0]._pools.values())
    engine.logits.clear()
    reqs = engine.generate(PROMPTS[1:2], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    assert reqs[0].metrics.cpu_experts > 0
    for got, want in zip(engine.logits, want_logits, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
    timing = engine.summary(reqs)
    assert timing["cpu_half_layers"] > 0 and timing["cpu_half_compute_s"] > 0
    assert timing["cpu_half_wait_s"] >= 0


def test_generate_json_reports_cpu_experts_and_costs(qwen, capsys):
    rc = main(["generate", "--model", str(qwen), "--device", "cpu", "--expert-budget", "25%", "--prompt", "Hello",
               "--max-new-tokens", "3", "--ignore-eos", "--miss-compute", "cpu", "--cpu-threads", "1", "--json"])
    out = capsys.readouterr()
    assert rc == 0
    result = json.loads(out.out)
    s = result["summary"]
    assert s["miss_compute"] == "cpu" and s["cpu_threads"] == 1 and s["miss_costs"]["copy_s"] > 0
    assert result["requests"][0]["cpu_experts"] == s["cpu_experts"] == s["misses"] > 0
    assert s["decode_path"].startswith("eager")
    line = [line for line in out.err.splitlines() if "miss compute cpu" in line][0]
    assert line.endswith("(1 CPU threads, float32 weights)")


@pytest.mark.parametrize("flags,message", [
    (["--miss-compute", "fast"], "--miss-compute 'fast' is not a mode: use one of gpu, cpu, auto"),
    (["--cpu-threads", "0"], "--cpu-threads 0 must be a whole number >= 1"),
    (["--cpu-threads", "many"], "--cpu-threads 'many' must be a whole number >= 1"),
    (["--cpu-expert-dtype", "fp8"], "--cpu-expert-dtype 'fp8' is not one of auto, model, float32"),
    (["--cpu-kernel", "mkl"], "--cpu-kernel 'mkl' is not one of torch, kt-kernel, auto"),
    (["--cpu-kernel", "kt-kernel"], "--cpu-kernel kt-kernel only shape misses computed on the CPU, and "
                                    "--miss-compute gpu computes none: pass --miss-compute cpu or auto, or drop it"),
    (["--cpu-expert-dtype", "float32", "--miss-compute", "gpu"], "--cpu-expert-dtype float32 only shape misses"),
])
def test_bad_flag_values_fail_in_one_line(flags, message, capsys):
    rc = main(["generate", "--device", "cpu", "--prompt", "hi", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines() == [err] and err.startswith(f"finemoe: error: {message}")


def test_all_experts_counted_once(qwen):
    """hits + misses is the same in every mode: a CPU-computed expert is one miss, not a miss and a hit."""
    engine = engine_for(qwen)
    totals = []
    for mode, costs in (("gpu", None), ("cpu", None), ("auto", EVEN)):
        run(engine, mode, costs or EVEN, PROMPTS)
        hits, misses, _, _ = counts(engine)
        totals.append(hits + misses)
    assert len(set(totals)) == 1


def test_the_split_follows_what_the_cpu_half_measures(qwen):
    """The calibrated CPU cost is scaled by the running ratio of measured to predicted CPU-half time, folded into
    the costs the split reads every ADAPT_EVERY layers; costs given explicitly stay as given."""
    from types import SimpleNamespace
    engine = engine_for(qwen)
    engine.reconfigure("lru", "25%", miss_compute="auto")            # calibrated: adapts
    cpu = engine.runtime.cpu_misses
    assert cpu.adapt and cpu.scale == 1.0
    base = cpu.base_costs
    job = SimpleNamespace(row_expert=torch.tensor([[3], [3], [5]]))   # expert 3 with 2 tokens, expert 5 with 1
    predicted = 2 * base.cpu_s + base.cpu_token_s
    for _ in range(cpu.ADAPT_EVERY):
        assert cpu.costs.cpu_s == base.cpu_s                          # not folded in yet
        cpu._adapt(job, 3.0 * predicted)
    assert 1.0 < cpu.scale < 3.0
    assert cpu.costs.cpu_s == pytest.approx(base.cpu_s * cpu.scale)
    assert engine.runtime.cpu_misses is cpu
    engine.reconfigure("lru", "25%", miss_compute="auto")            # the next configuration starts from it
    assert engine.runtime.cpu_misses.scale == pytest.approx(cpu.scale)
    assert engine.miss_compute_report()["cpu_cost_scale"] == pytest.approx(cpu.scale)
    engine.reconfigure("lru", "25%", miss_compute="auto", miss_costs=EVEN)
    fixed = engine.runtime.cpu_misses
    assert not fixed.adapt and fixed.costs == EVEN


@pytest.mark.parametrize("faster", ["gpu", "auto"])
@pytest.mark.parametrize("warm_up", [False, True])
def test_auto_is_timed_against_gpu_at_start_and_serves_the_faster(qwen, monkeypatch, capsys, faster, warm_up):
    """On a GPU `--miss-compute auto` is kept only where the stand-in decodes faster with it than copying every
    miss (engine/miss_choice.py); here the CPU engine is timed as a GPU one would be, with the measured TPOTs
    fixed so that `faster` wins. The engine then serves the configured policy under the winner, and when that is
    gpu it holds no CPU copy of the experts and is exact."""
    monkeypatch.setattr(miss_choice, "TIMED_ON", ("cpu",))
    timed = []

    def measure(engine, budget, miss_compute):
        timed.append((engine.cfg.policy, budget, miss_compute))
        return 0.010 if miss_compute == faster else 0.020

    monkeypatch.setattr(miss_choice, "measure", measure)
    cfg = EngineConfig(model=str(qwen), device="cpu", expert_budget="25%", policy="finemoe", miss_compute="auto",
                       warm_up=warm_up, show_progress=False)
    engine = Engine(load_model(cfg), cfg)
    assert [m for _, _, m in timed] == ["gpu", "auto"]
    assert engine.policy.name == "finemoe" and engine.cfg.miss_compute == faster
    s = engine.summary([])
    assert (s["miss_compute"], s["miss_compute_chosen_by"]) == (faster, "timing")
    assert s["miss_compute_tpot_s"] == {"gpu": 0.010 if faster == "gpu" else 0.020,
                                        "auto": 0.010 if faster == "auto" else 0.020}
    line = [x for x in capsys.readouterr().err.splitlines() if "decode steps" in x][0]
    assert line.startswith(f"finemoe: miss compute auto: {faster} (TPOT over 16 decode steps: gpu ")
    assert (engine.runtime.cpu_misses is None) == (faster == "gpu")
    if faster == "gpu":
        assert engine._cpu_kernels == {} and engine.miss_costs is None
        want = run(engine_for(qwen), "gpu", None, PROMPTS)[0]
        engine.reconfigure("lru", "25%")                      # no mode named: the chosen one stays
        assert engine.runtime.cpu_misses is None
        got = [r.output_ids for r in engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW,
                                                                             ignore_eos=True))]
        assert got == want


def test_auto_is_not_timed_on_the_cpu_and_a_named_mode_is_recorded_as_given(qwen):
    """Only a GPU engine times auto at start; benchmarks and tests measure a mode as given:
    reconfigure(miss_compute=...) is never second-guessed."""
    cfg = EngineConfig(model=str(qwen), device="cpu", expert_budget="25%", miss_compute="auto", show_progress=False)
    engine = Engine(load_model(cfg), cfg)
    assert (engine.summary([])["miss_compute"], engine.summary([])["miss_compute_chosen_by"]) == ("auto", "option")
    engine.reconfigure("lru", "25%", miss_compute="gpu")
    s = engine.summary([])
    assert (s["miss_compute"], s["miss_compute_chosen_by"], s["miss_compute_tpot_s"]) == ("gpu", "reconfigure", None)

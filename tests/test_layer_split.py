"""--non-expert-placement (issue 25): the decoder layers' non-expert weights over several devices, each MoE layer
computing its experts on its own layer's device (engine/layer_split.py, experts/placement.py, multi_device.py).

On the CPU several "devices" are several slot pools (as tests/test_multi_device.py): the layer ranges, the hooks at
their boundaries, the per-device slot tables and the peer copies into each computing device's staging slots all run,
and greedy tokens must equal plain transformers'. That the hooks move tensors between two real GPUs is not
observable here (every pool is on the CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine import memory_fit as mf
from finemoe.engine import placement_choice
from finemoe.errors import ConfigError
from finemoe.models.adapters import find_moe_layers, geometry_of
from finemoe.models.default import build_default_model
from helpers import NUM_EXPERTS, PAD_ID, TOP_K, reference_greedy, save_tiny_checkpoint

PROMPTS = ["Hello world", "The quick brown fox jumps", "MoE"]
PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)
TWO_CPUS = ("cpu", "cpu")


def engine(budget="5%", **kw) -> Engine:
    return Engine.from_config(EngineConfig(policy="lru", expert_budget=budget, device="cpu", show_progress=False,
                                           **kw))


@pytest.fixture(scope="module")
def expected():
    """The built-in model's greedy tokens with every expert resident on one device."""
    return [r.output_ids for p in PROMPTS for r in engine("100%").generate([p], PARAMS)]


def split(eng: Engine, devices=TWO_CPUS, per_device: int = 24) -> None:
    eng.reconfigure("lru", "5%", placement=eng.placement("split", devices, per_device))


def test_split_places_contiguous_layer_ranges_and_hooks_their_boundaries():
    eng = engine()
    split(eng)
    assert eng.layer_split.layer_device.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]     # 8 equal layers over 2 devices
    assert eng.layer_split.hooked == [4, 5, 6, 7]          # every layer off the first device takes its inputs there
    t = eng.cache.transport
    assert t.placement.moe_device.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert t.placement.staging.tolist() == [24, 24]        # both devices compute: one layer's landing slots each
    assert [p.num_slots for p in eng.device_pools] == [48, 48]
    assert eng.summary([])["non_expert_placement"] == "split"
    assert eng.summary([])["non_expert_placement_chosen_by"] == "placement"
    eng.reconfigure("lru", "5%", placement=eng.placement("primary", TWO_CPUS, 24))
    assert eng.layer_split.hooked == [] and eng.summary([])["non_expert_placement"] == "primary"


def test_the_summary_reports_the_mode_chosen_not_one_read_back_from_the_layer_devices():
    """A split whose shares put every layer on the first device (here: it has almost all the free memory) is
    still reported as split."""
    eng = engine()
    eng.free_bytes = [10**12, 1]
    placement = eng.placement("split", TWO_CPUS, 24)
    assert not placement.splits_layers
    eng.reconfigure("lru", "5%", placement=placement)
    s = eng.summary([])
    assert (s["non_expert_placement"], s["non_expert_placement_chosen_by"], s["placement_tpot_s"]) == (
        "split", "placement", None)


@pytest.mark.parametrize("batch", [1, 3])
def test_split_over_two_pools_generates_plain_transformers_tokens(expected, batch):
    eng = engine()
    split(eng)
    got = []
    for start in range(0, len(PROMPTS), batch):
        got += [r.output_ids for r in eng.generate(PROMPTS[start:start + batch], PARAMS)]
    assert got == expected
    s = eng.summary([])
    assert s["peer_copies"] > 0 and s["host_copies"] > 0


def test_split_over_three_pools_on_the_dynamic_path_is_exact_too(expected):
    eng = engine(fast_path=False)
    split(eng, ("cpu",) * 3, per_device=16)
    assert eng.layer_split.layer_device.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert eng.layer_split.hooked == [3, 4, 5, 6, 7]
    assert [r.output_ids for p in PROMPTS for r in eng.generate([p], PARAMS)] == expected


def test_split_under_continuous_batching_is_exact(expected):
    eng = engine()
    split(eng)
    reqs = eng.run_continuous([eng.make_request(p, PARAMS) for p in PROMPTS])
    assert [r.output_ids for r in reqs] == expected


def test_auto_times_both_placements_prints_its_choice_once_and_stays_exact(expected, capsys):
    eng = engine()
    candidates = {mode: eng.placement(mode, TWO_CPUS, 24) for mode in ("primary", "split")}
    choice = placement_choice.choose(eng, candidates, "5%")
    assert choice.mode in ("primary", "split") and set(choice.tpot_s) == {"primary", "split"}
    assert all(t > 0 for t in choice.tpot_s.values())
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"finemoe: non-expert placement auto: {choice.mode} (TPOT over")
    eng.reconfigure("lru", "5%", placement=candidates[choice.mode])
    assert [r.output_ids for p in PROMPTS for r in eng.generate([p], PARAMS)] == expected


def test_auto_is_measured_while_the_engine_starts_then_serves_the_configured_policy(expected, monkeypatch, capsys):
    """The start-up path of `--devices a,b` with the default auto, on two CPU pools: config.parse_devices (which
    allows several devices only as GPUs) is bypassed, everything after it is the engine's own."""
    monkeypatch.setattr("finemoe.config.parse_devices", lambda devices, device: tuple(devices))
    eng = Engine.from_config(EngineConfig(policy="lru", expert_budget="5%", device="cpu", devices=TWO_CPUS,
                                          show_progress=False))
    choice = eng.placement_choice
    assert choice.chosen_by == "timing" and set(choice.tpot_s) == {"primary", "split"}
    assert choice.mode == min(choice.tpot_s, key=choice.tpot_s.get)
    assert "finemoe: non-expert placement auto:" in capsys.readouterr().err
    s = eng.summary([])
    assert (s["non_expert_placement"], s["non_expert_placement_chosen_by"]) == (choice.mode, "timing")
    assert s["placement_tpot_s"] == choice.tpot_s and s["policy"] == "lru" and eng.cache.capacity == 48
    assert [r.output_ids for p in PROMPTS for r in eng.generate([p], PARAMS)] == expected
    other = "split" if choice.mode == "primary" else "primary"      # auto planned memory for both: either may run
    eng.reconfigure("lru", "5%", non_expert_placement=other)
    s = eng.summary([])
    assert (s["non_expert_placement"], s["non_expert_placement_chosen_by"], s["placement_tpot_s"]) == (
        other, "reconfigure", None)
    assert eng.layer_split.layer_device.any() == (other == "split")
    eng.reconfigure("lru", "5%")                                   # kept by later calls
    assert eng.summary([])["non_expert_placement"] == other


def test_a_named_option_is_recorded_as_the_option(monkeypatch):
    monkeypatch.setattr("finemoe.config.parse_devices", lambda devices, device: tuple(devices))
    eng = Engine.from_config(EngineConfig(policy="lru", expert_budget="5%", device="cpu", devices=TWO_CPUS,
                                          non_expert_placement="split", show_progress=False))
    s = eng.summary([])
    assert (s["non_expert_placement"], s["non_expert_placement_chosen_by"], s["placement_tpot_s"]) == (
        "split", "option", None)
    with pytest.raises(ConfigError, match="planned device memory for split only") as err:   # primary: not planned
        eng.reconfigure("lru", "5%", non_expert_placement="primary")
    assert "\n" not in str(err.value) and eng.summary([])["non_expert_placement"] == "split"   # left as it was


@pytest.mark.parametrize("arch", ["deepseek_v2", "mixtral"])
def test_split_on_a_saved_checkpoint_loaded_through_the_real_path_is_exact(arch, tmp_path):
    """deepseek_v2: decoder layer 0 is dense (no experts), so MoE layer l is decoder layer l + 1; mixtral: every
    layer is MoE. The budget holds one layer's top-k per device: layers evict each other's experts."""
    path = save_tiny_checkpoint(arch, tmp_path / arch)
    ids = [[72, 101, 108, 108, 111], [97], [84, 104, 101, 32, 113]]
    want = reference_greedy(AutoModelForCausalLM.from_pretrained(path).eval(), ids, 8, PAD_ID)
    eng = Engine.from_config(EngineConfig(model=str(path), device="cpu", expert_budget="100%", policy="lru",
                                          show_progress=False))
    placement = eng.placement("split", TWO_CPUS, TOP_K)
    eng.reconfigure("lru", TOP_K * eng.geometry.expert_bytes, placement=placement)
    n = len(eng.layer_split.decoders)
    assert placement.layer_device.tolist() == sorted(placement.layer_device.tolist()) and placement.splits_layers
    assert placement.moe_device.tolist() == placement.layer_device[[layer.decoder_index for layer in eng.layers]
                                                                   ].tolist()
    assert eng.cache.capacity == 2 * TOP_K and n >= 2 and eng.geometry.num_experts == NUM_EXPERTS
    got = [r.output_ids for r in eng.generate(ids, SamplingParams(max_new_tokens=8, ignore_eos=True))]
    assert got == want


# ---- the option ------------------------------------------------------------------------------------------------
@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_the_option_names_the_placements_each_configuration_may_run(two_gpus):
    assert EngineConfig(devices="cuda:0,cuda:1").placement_modes == ("primary", "split")          # auto: both
    assert EngineConfig(devices="cuda:0,cuda:1", non_expert_placement="split").placement_modes == ("split",)
    assert EngineConfig(devices="cuda:0,cuda:1", non_expert_placement="primary").placement_modes == ("primary",)
    assert EngineConfig(device="cpu").placement_modes == ("primary",)                          # one device
    assert EngineConfig(device="cpu", non_expert_placement="primary").placement_modes == ("primary",)


@pytest.mark.parametrize("kw, message", [
    (dict(non_expert_placement="replicate"), "--non-expert-placement 'replicate' is not known: use one of auto, "
                                             "primary, split"),
    (dict(non_expert_placement="split"), "--non-expert-placement split needs several --devices"),
    (dict(devices="cpu", non_expert_placement="split"), "--non-expert-placement split needs several --devices"),
])
def test_bad_values_are_refused_in_one_line(kw, message):
    with pytest.raises(ConfigError, match=message) as err:
        EngineConfig(device="cpu", **kw)
    assert "\n" not in str(err.value)


def test_the_cli_refuses_split_on_one_device_in_one_line(capsys):
    from finemoe.cli.main import main
    code = main(["generate", "--device", "cpu", "--non-expert-placement", "split", "--prompt", "a"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert "--non-expert-placement split needs several --devices" in line


# ---- the memory plan -------------------------------------------------------------------------------------------
LEN, BATCH = 64, 2
GPUS = [torch.device("cuda:0"), torch.device("cuda:1")]


@pytest.fixture(scope="module")
def model():
    m = build_default_model()
    layers = find_moe_layers(m)
    return m, layers, geometry_of(m, layers)


def plans(model, layer_device, free=(8 * 2**30, 8 * 2**30)):
    m, layers, g = model
    cfg = EngineConfig(device="cpu", dtype="float32", max_model_len=LEN, max_batch_size=BATCH)
    return mf.plan(m, layers, cfg, g, GPUS, LEN, list(free), layer_device)


def test_under_split_each_device_reserves_its_own_layers_weights_and_kv_cache(model):
    m, layers, g = model
    sizes = mf.layer_sizes(m, layers, EngineConfig(device="cpu", max_model_len=LEN, max_batch_size=BATCH), LEN)
    halves = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    first, second = plans(model, halves)
    assert first.non_expert == sizes.shared + sizes.weights[:4].sum() and second.non_expert == sizes.weights[4:].sum()
    assert first.kv == sizes.kv[:4].sum() == second.kv and first.kv + second.kv == sizes.kv.sum()
    assert first.staging == second.staging == g.num_experts * g.expert_bytes     # both compute MoE layers
    assert first.graphs == second.graphs == 0                                    # split decodes eagerly
    whole, rest = plans(model, np.zeros(8, np.int64))                            # primary: all on the first
    assert whole.non_expert == first.non_expert + second.non_expert and whole.kv == sizes.kv.sum()
    assert whole.graphs == mf.GRAPH_RESERVE_BYTES and (rest.non_expert, rest.kv, rest.staging) == (0, 0, 0)
    both = mf.tightest([plans(model, np.zeros(8, np.int64)), plans(model, halves)])   # auto: either must fit
    assert [p.for_experts for p in both] == [whole.for_experts, second.for_experts]


def test_auto_refuses_a_second_device_that_cannot_hold_its_layers(model):
    m, layers, g = model
    tight = plans(model, np.array([0, 0, 0, 0, 1, 1, 1, 1]), free=(8 * 2**30, mf.MARGIN_BYTES + 1000))
    with pytest.raises(ConfigError, match="cuda:1 cannot hold its decoder layers: .*--non-expert-placement primary"):
        mf.resolve_budget(EngineConfig(device="cpu", expert_budget="auto"), g, tight)

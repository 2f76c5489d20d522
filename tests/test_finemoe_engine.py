"""FineMoE in the engine and the CLI: exactness at every budget, offline build, online save-back, errors."""
import json

import pytest

from finemoe.cli.main import main
from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.policies.finemoe.map_store import MapStore

PROMPTS = ["The quick brown fox", "hi", "MoE experts live in host memory"]
PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)


def run(policy, budget=None, **options):
    engine = Engine.from_config(EngineConfig(device="cpu", policy=policy, expert_budget=budget,
                                             policy_options=options, show_progress=False))
    reqs = engine.generate(PROMPTS, PARAMS)
    engine.close()
    return engine, [r.output_ids for r in reqs]


@pytest.fixture(scope="module")
def reference_tokens():
    return run("resident")[1]


@pytest.fixture(scope="module")
def built_store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("maps") / "store.safetensors")
    engine, _ = run("finemoe", map_store=path, fresh=True, capacity=12)
    assert engine.policy.state_dict()["store_size"] == 12          # 3 prompts x 6 iterations > 12 -> RDY replaced
    assert engine.policy.state_dict()["store_replaced"] > 0
    return path


@pytest.mark.parametrize("budget", ["min", "25%", "100%"])
def test_greedy_tokens_equal_the_unmodified_model(budget, reference_tokens, built_store):
    if budget == "min":
        probe = Engine.from_config(EngineConfig(device="cpu", policy="lru", show_progress=False))
        budget = probe.geometry.min_budget_bytes
    engine, tokens = run("finemoe", budget, map_store=built_store, learn=False)
    assert tokens == reference_tokens
    assert engine.policy.state_dict()["store_size"] == 12


def test_the_stored_map_store_guides_prefetches(built_store):
    engine, _ = run("finemoe", "25%", map_store=built_store, learn=False)
    assert engine.cache.prefetch_copies > 0
    empty, _ = run("finemoe", "25%")                                    # no store, nothing to search yet at first
    assert empty.policy.state_dict()["store_size"] > 0                 # online: learned from served iterations


def test_cli_build_then_generate_online_saves_back(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    store = str(tmp_path / "maps.safetensors")
    assert main(["maps", "build", "--prompts", str(prompts), "--out", store, "--max-new-tokens", "3",
                 "--device", "cpu", "--capacity", "100"]) == 0
    assert MapStore.load(store).size == 3 * 3                           # one map per iteration (= new token)
    assert main(["generate", "--prompt", "hello", "--policy", "finemoe", "--map-store", store,
                 "--expert-budget", "25%", "--max-new-tokens", "2", "--device", "cpu", "--ignore-eos"]) == 0
    assert MapStore.load(store).size == 3 * 3 + 2                       # online mode learned 2 more iterations


def test_cli_rejects_a_corrupt_store(tmp_path, capsys):
    store = tmp_path / "bad.safetensors"
    store.write_bytes(b"\x00" * 64)
    code = main(["generate", "--prompt", "hi", "--policy", "finemoe", "--map-store", str(store),
                 "--max-new-tokens", "1", "--device", "cpu"])
    assert code == 2 and "truncated or corrupt" in capsys.readouterr().err


def test_cli_rejects_bad_policy_options(capsys):
    code = main(["generate", "--prompt", "hi", "--policy", "finemoe", "--policy-option", "search=everything",
                 "--max-new-tokens", "1", "--device", "cpu"])
    assert code == 2 and "search='everything'" in capsys.readouterr().err


def test_save_writes_the_learned_store_between_iterations(tmp_path):
    """The server's periodic save calls Policy.save(): it must write what was learned so far, atomically."""
    path = tmp_path / "store.safetensors"
    engine = Engine.from_config(EngineConfig(device="cpu", policy="finemoe", expert_budget="25%", show_progress=False,
                                             policy_options={"map_store": str(path), "fresh": True}))
    engine.generate(PROMPTS[:1], PARAMS)
    assert not path.exists()
    assert engine.policy.save() is True
    assert MapStore.load(str(path)).size == engine.policy.state_dict()["store_size"] > 0
    engine.close()
    read_only = Engine.from_config(EngineConfig(device="cpu", policy="finemoe", show_progress=False,
                                                policy_options={"map_store": str(path), "learn": False}))
    assert read_only.policy.save() is False

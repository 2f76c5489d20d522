"""`finemoe simulate --policy finemoe` works out of the box: `finemoe trace` records the model's input-embedding rows
of the routed tokens, the simulator reads them by default (the same rows as --embed-from the model's folder), and a
trace without them (the FLAME trace) runs finemoe's trajectory search only, saying so in one line on stderr."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import require_shared
from finemoe.cli.main import main
from finemoe.cli.replay_args import input_embedding
from finemoe.errors import ConfigError
from finemoe.policies import create_policy
from finemoe.traces import load_trace
from helpers import save_tiny_checkpoint


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(model folder, a trace of 4 prompts recorded from it)."""
    tmp = tmp_path_factory.mktemp("rec")
    model = save_tiny_checkpoint("qwen2_moe", tmp / "model")
    prompts = tmp / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about topic {i} please"}) + "\n" for i in range(4)))
    out = tmp / "t.safetensors"
    assert main(["trace", "--model", str(model), "--device", "cpu", "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "4", "--ignore-eos", "--quiet"]) == 0
    return model, str(out)


def simulate_json(capsys, *argv) -> tuple[list[dict], str]:
    assert main(["simulate", "--expert-budget", "50%", "--bandwidth", "inf", "--json", *argv]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out)["results"], captured.err


def test_trace_records_the_models_input_embedding_rows_of_its_tokens(recorded):
    model, path = recorded
    trace = load_trace(path)
    table = input_embedding(str(model)).weight
    assert trace.has_embedding and trace.embed_ids.tolist() == sorted(set(trace.token_ids.tolist()))
    np.testing.assert_array_equal(trace.embed_rows, table[torch.as_tensor(trace.embed_ids).long()].numpy())


def test_simulate_finemoe_needs_no_flags_and_equals_embed_from(recorded, capsys):
    model, path = recorded
    default, err = simulate_json(capsys, "--trace", path, "--policy", "finemoe")
    assert "finemoe: token semantics from the input-embedding rows recorded in" in err
    explicit, err = simulate_json(capsys, "--trace", path, "--policy", "finemoe", "--embed-from", str(model))
    assert f"--embed-from {model}" in err
    keys = ("hits", "misses", "bytes_copied", "prefetch_copies")
    assert [default[0][k] for k in keys] == [explicit[0][k] for k in keys]
    assert default[0]["hits"] + default[0]["misses"] > 0


def test_flame_trace_falls_back_to_trajectory_search_with_a_note(capsys):
    flame = require_shared("data", "traces", "flame_moe_290m.npz")
    rows, err = simulate_json(capsys, "--trace", f"{flame}#first10", "--policy", "finemoe", "--expert-bytes", "1000")
    lines = [line for line in err.splitlines() if line.startswith("finemoe: simulate:")]
    assert len(lines) == 1 and "trajectory search only" in lines[0] and "--embed-from" in lines[0]
    assert rows[0]["policy"] == "finemoe" and 0 < rows[0]["hit_rate"] < 1


def test_an_explicit_semantic_option_is_kept_and_named(recorded, capsys):
    _, path = recorded
    _, err = simulate_json(capsys, "--trace", path, "--policy", "finemoe", "--policy-option",
                           "finemoe:search=trajectory", "--policy-option", "finemoe:semantic=none")
    assert "semantic='none' as --policy-option sets it" in err


def test_semantic_none_needs_trajectory_search():
    with pytest.raises(ConfigError, match="search='trajectory'"):
        create_policy("finemoe", semantic="none")


def test_tune_keeps_finemoe_in_its_default_policies(recorded, capsys):
    _, path = recorded
    assert main(["tune", "--trace", path, "--expert-budget", "50%", "--json"]) == 0
    captured = capsys.readouterr()
    assert "finemoe" in {r["policy"] for r in json.loads(captured.out)["results"]}
    assert "left out" not in captured.err

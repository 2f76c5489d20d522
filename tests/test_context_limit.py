"""The max model length is the model's own max_position_embeddings unless --max-model-len lowers it; prompts
that do not fit are refused with one line in the CLI and 400 context_length_exceeded in the server."""
from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from finemoe import EngineConfig
from finemoe.cli.main import main
from finemoe.engine import Engine, SamplingParams
from finemoe.errors import ConfigError
from finemoe.engine.engine import context_limit
from finemoe.models.default import default_config
from finemoe.server import create_app
from helpers import save_tiny_checkpoint

POSITIONS = 48   # the tiny checkpoint's max_position_embeddings


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory):
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("ckpt") / "short",
                                max_position_embeddings=POSITIONS)


def engine_for(model_dir, **kw) -> Engine:
    return Engine.from_config(EngineConfig(model=str(model_dir), device="cpu", show_progress=False, **kw))


def test_default_limit_is_the_models_positions(short_dir):
    assert engine_for(short_dir).max_model_len == POSITIONS


def test_builtin_model_keeps_its_own_positions():
    assert context_limit(default_config(), None) == default_config().max_position_embeddings == 4096


def test_max_model_len_may_lower_the_limit_but_not_raise_it(short_dir):
    assert engine_for(short_dir, max_model_len=20).max_model_len == 20
    with pytest.raises(ConfigError, match=f"exceeds the model's {POSITIONS} positions"):
        engine_for(short_dir, max_model_len=POSITIONS + 1)


def test_a_prompt_past_the_models_positions_is_refused(short_dir):
    engine = engine_for(short_dir)
    with pytest.raises(ConfigError, match=f"max_model_len {POSITIONS}"):
        engine.generate([list(range(3, 3 + POSITIONS))], SamplingParams(max_new_tokens=1))


@pytest.mark.parametrize("command", ["generate", "trace", "maps", "bench"])
def test_cli_refuses_a_too_long_prompt_in_one_line(short_dir, tmp_path, capsys, command):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "%s"}\n' % ("x" * (POSITIONS + 10)) * 4)
    out = str(tmp_path / "out.safetensors")
    argv = {"generate": ["generate", "--prompts", str(prompts)],
            "trace": ["trace", "--prompts", str(prompts), "--out", out],
            "maps": ["maps", "build", "--prompts", str(prompts), "--out", out],
            "bench": ["bench", "--prompts", str(prompts), "--max-prompt-tokens", "99", "--out", str(tmp_path)],
            }[command]
    code = main([*argv, "--model", str(short_dir), "--device", "cpu", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]   # above it: the model-loading progress bar
    assert code == 2 and "Traceback" not in err
    assert last.startswith("finemoe: error:") and f"max_model_len {POSITIONS}" in last


def test_server_refuses_with_the_engines_limit(short_dir):
    engine = engine_for(short_dir, expert_budget="25%")
    with TestClient(create_app(engine)) as http:
        model = http.get("/v1/models").json()["data"][0]
        assert model["max_model_len"] == POSITIONS
        r = http.post("/v1/completions", json={"model": model["id"], "prompt": list(range(3, 3 + POSITIONS))})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"

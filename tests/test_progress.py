"""Long commands show prompts done, rate and time left on stderr when it is a terminal, never with --quiet or
when stderr is piped; `maps build` shapes prompts like `trace` (--template, --max-prompt-tokens, --limit)."""
from __future__ import annotations

import io
import json

import pytest

from finemoe import EngineConfig
from finemoe.cli.common import progress_bar
from finemoe.cli.main import main
from finemoe.engine import Engine, SamplingParams
from finemoe.traces import load_trace


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_shows_count_rate_and_time_left():
    stream = Terminal()
    with progress_bar(3, "trace", quiet=False, stream=stream) as bar:
        bar.update(2)
        bar.update(1)
    text = stream.getvalue()
    assert "trace" in text and "3/3" in text and "prompt/s" in text and "<" in text   # elapsed<left


@pytest.mark.parametrize("stream,quiet", [(Terminal(), True), (io.StringIO(), False)], ids=["quiet", "piped"])
def test_bar_is_off_when_quiet_or_piped(stream, quiet):
    with progress_bar(3, "trace", quiet=quiet, stream=stream) as bar:
        bar.update(3)
    assert stream.getvalue() == ""


def test_engine_reports_each_finished_batch():
    engine = Engine.from_config(EngineConfig(device="cpu", expert_budget="25%", max_batch_size=2, show_progress=False))
    done = []
    engine.generate(["a", "b", "c"], SamplingParams(max_new_tokens=1), on_batch=done.append)
    assert done == [2, 1]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(5)))
    return str(path)


def test_maps_build_takes_template_max_prompt_tokens_and_limit(capsys, tmp_path, prompts):
    out = tmp_path / "maps.safetensors"
    code = main(["maps", "build", "--device", "cpu", "--prompts", prompts, "--out", str(out), "--max-new-tokens", "1",
                 "--template", "Q: {prompt} A:", "--max-prompt-tokens", "6", "--limit", "3", "--quiet"])
    assert code == 0 and "from 3 prompts" in capsys.readouterr().out


def test_trace_shapes_prompts_with_the_same_flags(tmp_path, prompts):
    out = tmp_path / "t.safetensors"
    assert main(["trace", "--device", "cpu", "--prompts", prompts, "--out", str(out), "--max-new-tokens", "1",
                 "--template", "Q: {prompt} A:", "--max-prompt-tokens", "6", "--limit", "3", "--quiet"]) == 0
    trace = load_trace(str(out))
    assert trace.num_requests == 3 and all(len(trace.prompt_ids(i)) == 6 for i in range(3))


@pytest.mark.parametrize("command", [["trace", "--out", "{tmp}/t.safetensors"], ["generate"],
                                     ["maps", "build", "--out", "{tmp}/m.safetensors"]], ids=lambda c: c[0])
def test_each_long_command_shows_the_same_bar_on_a_terminal(monkeypatch, tmp_path, prompts, command):
    stderr = Terminal()
    monkeypatch.setattr("sys.stderr", stderr)
    argv = [a.format(tmp=tmp_path) for a in command]
    assert main([*argv, "--device", "cpu", "--prompts", prompts, "--max-new-tokens", "1", "--max-batch-size", "5"]) == 0
    desc = "maps build" if command[0] == "maps" else command[0]
    assert f"{desc}: 100%" in stderr.getvalue() and "5/5" in stderr.getvalue() and "prompt/s" in stderr.getvalue()

"""`finemoe maps build` keeps its work: the store learned so far is checkpointed to OUT.partial every few batches, a
killed build leaves it behind, and `--resume` continues it (skipping the prompts done) to the same store an
uninterrupted build writes; a checkpoint of another command is refused in one line."""
from __future__ import annotations

import json

import pytest
from safetensors.numpy import load_file

from finemoe.cli.build_checkpoint import read_progress
from finemoe.cli.main import main
from finemoe.engine import Engine


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"prompt number {i} is here"}) + "\n" for i in range(6)))
    return str(path)


def build(prompts, out, *extra) -> int:
    return main(["maps", "build", "--device", "cpu", "--prompts", prompts, "--out", str(out), "--max-new-tokens", "2",
                 "--max-batch-size", "2", "--checkpoint-every", "2", "--quiet", *extra])


@pytest.fixture
def interrupted(monkeypatch, tmp_path, prompts, capsys):
    """A build killed (Ctrl-C) during its second batch: OUT.partial holds the first batch."""
    out = tmp_path / "maps.safetensors"
    real_run, calls = Engine.run, []

    def run_then_interrupt(self, requests, on_batch=None):
        calls.append(len(requests))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(self, requests, on_batch)

    monkeypatch.setattr(Engine, "run", run_then_interrupt)
    assert build(prompts, out) == 130
    monkeypatch.setattr(Engine, "run", real_run)
    assert "2 of 6 prompts kept" in capsys.readouterr().err
    return out


def test_an_uninterrupted_build_leaves_no_checkpoint(tmp_path, prompts):
    out = tmp_path / "maps.safetensors"
    assert build(prompts, out) == 0
    assert out.exists() and not (tmp_path / "maps.safetensors.partial").exists()


def test_a_killed_build_resumes_to_the_same_store(tmp_path, prompts, interrupted, capsys):
    partial = f"{interrupted}.partial"
    assert read_progress(partial).done == 2 and not interrupted.exists()
    assert build(prompts, interrupted, "--resume") == 0
    assert "resuming" in capsys.readouterr().err and not (tmp_path / "maps.safetensors.partial").exists()
    whole = tmp_path / "whole.safetensors"
    assert build(prompts, whole) == 0
    resumed, expected = load_file(str(interrupted)), load_file(str(whole))
    assert resumed["maps"].shape[0] == 6 * 2          # one map per prompt and iteration (capacity not reached)
    for name in ("maps", "sems"):
        assert (resumed[name] == expected[name]).all()


def test_a_left_checkpoint_needs_resume_or_overwrite(prompts, interrupted, capsys):
    assert build(prompts, interrupted) == 2
    assert "interrupted build" in capsys.readouterr().err
    assert build(prompts, interrupted, "--overwrite") == 0


@pytest.mark.parametrize("change,named", [(["--template", "Q: {prompt}"], "prompts"),
                                         (["--capacity", "7"], "capacity")])
def test_resume_refuses_a_checkpoint_of_another_command(prompts, interrupted, capsys, change, named):
    assert build(prompts, interrupted, "--resume", *change) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another command" in err[0] and named in err[0]


def test_resume_without_a_checkpoint_says_so(tmp_path, prompts, capsys):
    assert build(prompts, tmp_path / "none.safetensors", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err

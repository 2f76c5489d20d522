"""A newcomer's mistakes get one line naming the problem and the fix (exit code 2), never a traceback: a missing
pip extra, a prompts file that is not UTF-8, --out at a folder or an existing file, a port in use, an unknown
policy option, a model directory that does not exist. Each is caught before a model loads."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from finemoe.cli.main import main
from finemoe.errors import ConfigError, UnknownPolicyError
from finemoe.policies import create_policy
from finemoe.prompts import read_prompts


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("finemoe: error: ")
    return line


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"}\n')
    return str(path)


@pytest.mark.parametrize("argv, prog, message", [
    (["generate"], "finemoe generate", "one of the arguments --prompt --prompts is required"),
    (["serve", "--port", "abc"], "finemoe serve", "argument --port: invalid int value: 'abc'"),
    (["nosuch"], "finemoe", "argument COMMAND: invalid choice: 'nosuch'"),
    (["maps", "build"], "finemoe maps build", "the following arguments are required: --prompts, --out"),
    (["generate", "--prompt", "hi", "--bogus"], "finemoe generate", "unrecognized arguments: --bogus"),
    (["maps", "build", "--prompts", "p", "--out", "o", "--zz"], "finemoe maps build", "unrecognized arguments: --zz"),
])
def test_usage_errors_are_one_line_that_points_at_help(argv, prog, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    (line,) = capsys.readouterr().err.splitlines()
    assert e.value.code == 2
    assert line.startswith(f"{prog}: error: {message}") and line.endswith(f"(`{prog} --help` lists the flags)")


def test_help_does_not_need_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from finemoe.cli.main import main\nmain(['--help'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout, out.stderr


def test_bench_without_matplotlib_names_the_plot_extra(capsys, monkeypatch, prompts, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)         # `import matplotlib` now raises ImportError
    line = one_line_error(capsys, ["bench", "--prompts", prompts, "--out", str(tmp_path / "o")])
    assert "matplotlib" in line and '".[plot]"' in line


@pytest.mark.parametrize("missing", ["uvicorn", "fastapi"])
def test_serve_without_its_extra_names_the_serve_extra(capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    line = one_line_error(capsys, ["serve", "--device", "cpu", "--model", "/no/such/model"])
    assert missing in line and '".[serve]"' in line


def test_serve_reports_a_port_in_use_before_loading_the_model(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(capsys, ["serve", "--device", "cpu", "--port", str(port), "--model", "/no/such/model"])
    assert f"port {port}" in line and "already in use" in line and "--port" in line


def test_prompts_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.jsonl:2: not valid UTF-8 .*save the file as UTF-8"):
        read_prompts(str(path))


def test_generate_with_a_non_utf8_prompts_file_is_one_line(capsys, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "\xff"}\n')
    assert "not valid UTF-8" in one_line_error(capsys, ["generate", "--device", "cpu", "--prompts", str(path)])


@pytest.mark.parametrize("command", [["trace"], ["maps", "build"]])
def test_out_at_a_folder_or_an_existing_file_is_refused(capsys, tmp_path, prompts, command):
    argv = [*command, "--device", "cpu", "--prompts", prompts, "--model", "/no/such/model", "--out"]
    assert "is a directory" in one_line_error(capsys, [*argv, str(tmp_path)])
    existing = tmp_path / "old.safetensors"
    existing.write_bytes(b"keep me")
    assert "--overwrite" in one_line_error(capsys, [*argv, str(existing)])
    assert existing.read_bytes() == b"keep me"
    assert "does not exist" in one_line_error(capsys, [*argv, str(tmp_path / "missing" / "x.safetensors")])


def test_bench_out_at_a_file_is_refused(capsys, tmp_path, prompts):
    existing = tmp_path / "results"
    existing.write_text("x")
    assert "is a file" in one_line_error(capsys, ["bench", "--prompts", prompts, "--out", str(existing)])


def test_unknown_policy_option_lists_the_valid_ones():
    with pytest.raises(UnknownPolicyError, match="bad options \\['prefetch_distanse'\\].*valid options: .*"
                                                 "prefetch_distance"):
        create_policy("finemoe", prefetch_distanse=2)
    with pytest.raises(UnknownPolicyError, match="valid options: none"):
        create_policy("lfu", nope=1)


@pytest.mark.parametrize("path", ["/no/such/model", "./not-here", "~/not-here-either", "a/b/c"])
def test_a_missing_local_model_fails_at_once_without_the_hub(capsys, path):
    t0 = time.perf_counter()
    line = one_line_error(capsys, ["generate", "--device", "cpu", "--prompt", "hi", "--model", path])
    assert time.perf_counter() - t0 < 5       # generous: the hub client's retries took ~28 s
    assert os.path.expanduser(path) in line and "does not exist" in line

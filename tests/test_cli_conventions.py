"""The command line follows the usual conventions: help without importing torch, every flag described and its
default shown, an example per command, --version, `python -m finemoe`; internal policies and flags that do not apply
are not offered; prompt templates read \\n as a newline; `generate --template` and `--chat` shape prompts."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from finemoe import __version__
from finemoe.cli.common import POLICIES
from finemoe.cli.main import COMMANDS, build_parser, main
from finemoe.models.default import default_tokenizer
from finemoe.prompts import unescape_template
from helpers import save_tiny_checkpoint


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """'generate', 'maps build', ... -> the parser of that command, with its flags."""
    out = {}
    for name in COMMANDS:
        sub = next(a for a in build_parser([name])._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in nested:
            out.update({f"{name} {n}": p for n, p in action.choices.items()})
        if not nested:
            out[name] = parser
    return out


def test_every_flag_of_every_command_is_described():
    parsers = command_parsers()
    assert {"generate", "trace", "simulate", "tune", "serve", "maps build", "bench"} <= set(parsers)
    for name, parser in parsers.items():
        bare = [a.option_strings or a.dest for a in parser._actions if not (a.help or "").strip()]
        assert bare == [], f"finemoe {name}: flags without help: {bare}"


def test_help_imports_neither_torch_nor_numba():
    every_help = [["--help"]] + [[*name.split(), "--help"] for name in command_parsers()]
    code = ("import sys\nfrom finemoe.cli.main import main\n"
            f"for argv in {every_help!r}:\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "    heavy = [m for m in ('torch', 'numba', 'transformers') if m in sys.modules]\n"
            "    assert not heavy, f'finemoe {\" \".join(argv)} imported {heavy}'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_simulator_and_the_config_import_no_transformers():
    """`simulate` and `tune` run without transformers (docs/ARCHITECTURE.md): the simulator, the traces and the
    config it validates against import none of it."""
    code = ("import sys\nimport finemoe.config, finemoe.simulator, finemoe.simulator.tuning, finemoe.traces\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_help_shows_defaults_and_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "tokens to generate per prompt (default: 32)" in " ".join(out.split())
    assert "(default: lru)" in out and "(default: True)" not in out and "(default: None)" not in out
    assert "example:\n  finemoe generate --prompt" in out


def test_version_and_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "finemoe", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"finemoe {__version__}"
    proc = subprocess.run([sys.executable, "-m", "finemoe", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: finemoe ")
    assert all(name in proc.stdout for name in COMMANDS)


def test_the_internal_record_policy_is_not_offered(capsys):
    from finemoe.policies import available, get_policy_class

    shipped = [name for name in available() if get_policy_class(name).__module__.startswith("finemoe.")]
    assert tuple(shipped) == POLICIES          # the CLI's list is the registry's (less policies tests register)
    assert "record" not in available() and get_policy_class("record").internal
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "record" not in capsys.readouterr().out
    assert main(["generate", "--device", "cpu", "--prompt", "hi", "--policy", "record"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("finemoe: error: unknown policy 'record'") and err.splitlines() == [err]


def test_flags_that_do_not_apply_are_not_offered():
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in command_parsers().items()}
    assert {"--policy", "--map-store"}.isdisjoint(flags["maps build"])   # it builds finemoe's store at --out
    assert "--policy-option" in flags["maps build"]
    assert "--map-store" not in flags["trace"]                           # the recorder keeps no store
    assert {"--policy", "--map-store", "--chat", "--template"} <= flags["generate"]
    assert {"--api-key", "--served-model-name", "--chat-template"} <= flags["serve"]


def test_templates_read_backslash_n_and_t_as_typed_in_a_shell():
    assert unescape_template(r"User: {prompt}\n\nAssistant:") == "User: {prompt}\n\nAssistant:"
    assert unescape_template("User: {prompt}\n\nAssistant:") == "User: {prompt}\n\nAssistant:"   # bash $'...'
    assert unescape_template(r"a\tb\\nc") == "a\tb\\nc"


def generated(capsys, *argv: str) -> list[list[int]]:
    code = main(["generate", "--device", "cpu", "--max-new-tokens", "3", "--ignore-eos", "--json", "--quiet", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [r["output_token_ids"] for r in json.loads(out)["requests"]]


def test_generate_template_equals_the_prompt_written_out(capsys):
    want = generated(capsys, "--prompt", "Q: hi\nA:")
    assert generated(capsys, "--prompt", "hi", "--template", r"Q: {prompt}\nA:") == want


def test_generate_chat_applies_the_chat_template(capsys):
    text = default_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                   tokenize=False)
    assert generated(capsys, "--prompt", "hi", "--chat") == generated(capsys, "--prompt", text)


def test_generate_chat_without_a_chat_template_is_one_line(capsys, tmp_path):
    ckpt = save_tiny_checkpoint("olmoe", tmp_path / "olmoe")
    (ckpt / "chat_template.jinja").unlink()
    code = main(["generate", "--device", "cpu", "--model", str(ckpt), "--prompt", "hi", "--chat", "--quiet"])
    line = capsys.readouterr().err.strip().splitlines()[-1]   # after the model's loading bars
    assert code == 2 and line.startswith("finemoe: error: --chat: ")
    assert "has no chat template" in line and "--template" in line

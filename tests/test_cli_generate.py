"""`finemoe generate`: the --json schema, --prompts FILE.jsonl, and user errors as one line with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from finemoe.cli.main import main
from helpers import PAD_ID, reference_greedy, save_tiny_checkpoint

REQUEST_KEYS = {"prompt", "output_token_ids", "text", "ttft_s", "tpot_s", "hits", "misses", "hit_rate", "bytes_copied"}
AGGREGATE_KEYS = {"ttft_s", "tpot_s", "hits", "misses", "hit_rate", "bytes_copied"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("ckpt") / "mixtral")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", "--device", "cpu", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_of_the_builtin_default_model(capsys):
    code, out, _ = run_cli(capsys, "--prompt", "Hello", "--max-new-tokens", "3", "--expert-budget", "25%",
                           "--ignore-eos", "--json")
    assert code == 0
    doc = json.loads(out)                                   # stdout is exactly one JSON object
    assert set(doc) == {"requests", "summary"}
    (req,) = doc["requests"]
    assert REQUEST_KEYS <= set(req)
    assert req["prompt"] == "Hello"
    assert len(req["output_token_ids"]) == 3 and all(isinstance(t, int) for t in req["output_token_ids"])
    assert isinstance(req["text"], str)
    assert req["hits"] + req["misses"] > 0
    assert req["hit_rate"] == pytest.approx(req["hits"] / (req["hits"] + req["misses"]))
    s = doc["summary"]
    assert AGGREGATE_KEYS | {"policy", "expert_budget_bytes", "device"} <= set(s)
    assert (s["policy"], s["device"]) == ("lru", "cpu")
    assert s["expert_budget_bytes"] == s["total_expert_bytes"] // 4
    assert (s["hits"], s["misses"], s["bytes_copied"]) == (req["hits"], req["misses"], req["bytes_copied"])
    assert "random" in s["model_label"]                    # the built-in model says it is not trained


def test_prompts_file_runs_every_line_in_order_with_exact_tokens(capsys, tiny_dir, tmp_path):
    prompts = ["Hello there", "Why", "A longer prompt than the others"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(prompts)) + "\n\n")
    code, out, _ = run_cli(capsys, "--model", str(tiny_dir), "--prompts", str(path), "--max-new-tokens", "4",
                           "--expert-budget", "25%", "--ignore-eos", "--json")
    assert code == 0
    doc = json.loads(out)
    assert [r["prompt"] for r in doc["requests"]] == prompts
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    want = reference_greedy(model, [tok(p, add_special_tokens=False)["input_ids"] for p in prompts], 4, PAD_ID)
    assert [r["output_token_ids"] for r in doc["requests"]] == want
    s = doc["summary"]
    assert s["hits"] == sum(r["hits"] for r in doc["requests"])
    assert s["misses"] == sum(r["misses"] for r in doc["requests"])


def test_plain_text_output_reports_the_hit_rate(capsys, tiny_dir):
    code, out, _ = run_cli(capsys, "--model", str(tiny_dir), "--prompt", "Hi", "--max-new-tokens", "2",
                           "--policy", "resident")
    assert code == 0
    assert ">>> Hi" in out and "hit rate 1.000" in out and "policy: resident" in out


USER_ERRORS = {
    "bad-budget": (["--prompt", "hi", "--expert-budget", "lots"], "expert budget 'lots'"),
    "unknown-policy": (["--prompt", "hi", "--policy", "nope"], "unknown policy 'nope'"),
    "missing-model": (["--prompt", "hi", "--model", "{tmp}/no-such-model"], "cannot read a model config"),
    "missing-prompts-file": (["--prompts", "{tmp}/missing.jsonl"], "cannot read prompts file"),
    "prompts-line-without-prompt": (["--prompts", "{tmp}/bad.jsonl"], "bad.jsonl:2: each line needs"),
    "prompts-line-not-json": (["--prompts", "{tmp}/notjson.jsonl"], "notjson.jsonl:1: not valid JSON"),
    "budget-too-small": (["--prompt", "hi", "--model", "{tiny}", "--expert-budget", "1KB"], "or more"),
    "resident-partial": (["--prompt", "hi", "--model", "{tiny}", "--policy", "resident", "--expert-budget", "50%"],
                         "keeps every expert on the device"),
    "zero-new-tokens": (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    "empty-prompt": (["--prompt", "", "--model", "{tiny}"], "the prompt is empty"),
    "bad-device": (["--prompt", "hi", "--device", "tpu"], "device 'tpu' is not supported"),
    "bad-policy-option": (["--prompt", "hi", "--policy-option", "novalue"], "expected KEY=VALUE"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_print_one_line_and_exit_2(capsys, tmp_path, tiny_dir, case):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    (tmp_path / "notjson.jsonl").write_text("prompt: hi\n")
    argv, expected = USER_ERRORS[case]
    argv = [a.format(tmp=tmp_path, tiny=tiny_dir) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("finemoe")]   # besides load progress bars
    assert line.startswith("finemoe: error: ") and expected in line
    assert err.rstrip().endswith(line)                       # the error is the last thing printed


def test_a_real_process_exits_2_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "finemoe.cli.main", "generate", "--prompt", "hi", "--device", "cpu",
                           "--expert-budget", "lots"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("finemoe: error: expert budget 'lots' is not understood")

"""benchmarks/cli_help_time.py (how long `finemoe ... --help` takes, and what it imports), one run per help: the
timing itself is the script's report, not a test; this checks what the script reports."""
from __future__ import annotations

import json

from conftest import load_benchmark


def test_cli_help_time_reports_each_help_and_its_imports(tmp_path, capsys):
    bench = load_benchmark("cli_help_time")
    out = tmp_path / "help.json"
    assert bench.main(["--repeat", "1", "--commands", "generate", "--out", str(out)]) == 0
    rows = {r["what"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"python -c pass", "python -c 'import torch'", "finemoe --help", "finemoe generate --help"}
    assert all(r["ms"] > 0 for r in rows.values())
    assert rows["python -c 'import torch'"]["imported"] == ["torch"]
    assert rows["finemoe --help"]["imported"] == [] and rows["finemoe generate --help"]["imported"] == []
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| `finemoe generate --help` |")

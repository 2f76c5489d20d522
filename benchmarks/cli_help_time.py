"""How long `finemoe --help` and `finemoe COMMAND --help` take: wall time of a fresh `python -m finemoe ... --help`
process (median of --repeat runs), beside the interpreter's own start (`python -c pass`) and `import torch`, which
help must not pay for; each help is also run once more to record whether it imported torch, numba or transformers.

    python3 benchmarks/cli_help_time.py --out cli_help_time.json
    python3 benchmarks/cli_help_time.py --repeat 1 --commands generate          # seconds (tests)

Prints a table last: one row per help, median ms and the heavy modules it imported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "numba", "transformers")
PROBE = ("import sys, runpy; sys.argv = ['finemoe', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('finemoe', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         f"print('IMPORTED', *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)")


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{path}" if path else str(SRC)}


def wall_ms(argv: list[str], repeat: int) -> float:
    """Median wall time (ms) of a fresh `python ARGV` process."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *argv], env=_env(), capture_output=True, check=True)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def imported(args: list[str]) -> list[str]:
    """The heavy modules (HEAVY) that `finemoe ARGS` imported."""
    err = subprocess.run([sys.executable, "-c", PROBE, *args], env=_env(), capture_output=True, text=True,
                         check=True).stderr
    line = next(line for line in err.splitlines() if line.startswith("IMPORTED"))
    return line.split()[1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="fresh processes per help (the median is reported)")
    ap.add_argument("--commands", default=None,
                    help="comma-separated commands to time (default: all of finemoe.cli.main.COMMANDS)")
    ap.add_argument("--out", default=None, help="write the full JSON here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(SRC))
    from finemoe.cli.main import COMMANDS

    commands = args.commands.split(",") if args.commands else list(COMMANDS)
    helps = [["--help"]] + [[*c.split(), "--help"] for c in commands]
    if "maps" in commands:
        helps.append(["maps", "build", "--help"])
    rows = [{"what": "python -c pass", "ms": wall_ms(["-c", "pass"], args.repeat), "imported": []},
            {"what": "python -c 'import torch'", "ms": wall_ms(["-c", "import torch"], args.repeat),
             "imported": ["torch"]}]
    for h in helps:
        rows.append({"what": "finemoe " + " ".join(h), "ms": wall_ms(["-m", "finemoe", *h], args.repeat),
                     "imported": imported(h)})
    result = {"python": sys.version.split()[0], "repeat": args.repeat, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"fresh processes, median of {args.repeat}; Python {result['python']}")
    print("| command | ms | heavy modules imported |")
    print("|---|---|---|")
    for r in rows:
        print(f"| `{r['what']}` | {r['ms']:.0f} | {', '.join(r['imported']) or 'none'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

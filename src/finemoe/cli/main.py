"""`finemoe` command line: one subcommand per module in this package, each exposing
`add_parser(subparsers)` (which sets `func`). User errors print one line and exit 2, never a traceback."""
from __future__ import annotations

import argparse
import importlib
import sys

from finemoe.errors import FineMoEError

COMMANDS = [
    "finemoe.cli.generate",
    "finemoe.cli.trace",
    "finemoe.cli.simulate",
    "finemoe.cli.serve",
    "finemoe.cli.maps",
    "finemoe.cli.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finemoe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FineMoEError as e:
        print(f"finemoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

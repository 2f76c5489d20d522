"""`finemoe` command line: serve, trace and simulate MoE models with experts offloaded to host memory.

One subcommand per module in this package, each exposing `add_parser(subparsers)` (which sets `func`). User
errors print one line and exit 2, never a traceback."""
from __future__ import annotations

import argparse
import importlib
import sys

from finemoe.errors import FineMoEError

COMMANDS = {   # subcommand -> its module, in `finemoe --help` order
    "generate": "finemoe.cli.generate",
    "trace": "finemoe.cli.trace",
    "simulate": "finemoe.cli.simulate",
    "tune": "finemoe.cli.tune",
    "serve": "finemoe.cli.serve",
    "maps": "finemoe.cli.maps",
    "bench": "finemoe.cli.bench",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. When `argv` names a subcommand only that module is imported: the others import the engine
    and transformers, seconds that `finemoe simulate` (numpy and the policies) does not need. Otherwise every
    subcommand is added, for the full help and argparse's own errors."""
    parser = argparse.ArgumentParser(prog="finemoe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    first = next((a for a in argv or [] if not a.startswith("-")), None)
    for name in [first] if first in COMMANDS else COMMANDS:
        importlib.import_module(COMMANDS[name]).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FineMoEError as e:
        print(f"finemoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

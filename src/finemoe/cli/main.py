"""`finemoe` command line: serve, trace and simulate MoE models with experts offloaded to host memory.

One subcommand per module of this package (COMMANDS), each exposing `add_arguments(parser)`, which adds its
flags and sets `func`. Only the module of the command named on the command line is imported, none for
`finemoe --help`, and the modules import torch and transformers inside their `run` functions: every `--help`
answers without them (benchmarks/cli_help_time.py measures it). User errors print one line and exit 2, never
a traceback."""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from dataclasses import dataclass

from finemoe import __version__
from finemoe.errors import FineMoEError


@dataclass(frozen=True)
class Command:
    module: str    # defines add_arguments(parser)
    summary: str   # its line in `finemoe --help`
    example: str   # shown under `finemoe COMMAND --help`


COMMANDS = {   # in `finemoe --help` order
    "generate": Command(
        "finemoe.cli.generate", "generate text with experts offloaded to host memory",
        'finemoe generate --prompt "Hello, MoE" --expert-budget 25%\n'
        'finemoe generate --model Qwen/Qwen1.5-MoE-A2.7B --expert-budget 6GiB --chat --prompts prompts.jsonl --json'),
    "trace": Command(
        "finemoe.cli.trace", "record per-token routing (top-k ids, router probabilities) to a trace file",
        "finemoe trace --prompts prompts.jsonl --template 'User: {prompt}\\n\\nAssistant:' --out trace.safetensors"),
    "simulate": Command(
        "finemoe.cli.simulate", "predict hit rate, bytes and TTFT/TPOT of policies from a routing trace",
        "finemoe simulate --trace trace.safetensors --policy lru,lfu,oracle --expert-budget 10%,25% --bandwidth 48.4"),
    "tune": Command(
        "finemoe.cli.tune", "predict TPOT/TTFT/hit rate over budgets x policies x miss-compute modes and recommend one",
        "finemoe tune --trace trace.safetensors --expert-budget 25% --policy lru,moe-infinity,finemoe"),
    "serve": Command(
        "finemoe.cli.serve", "serve an OpenAI-compatible HTTP API (FastAPI + uvicorn; the serve extra)",
        "finemoe serve --expert-budget 25% --port 8000\n"
        "finemoe serve --model Qwen/Qwen1.5-MoE-A2.7B --expert-budget 6GiB --served-model-name qwen-moe "
        "--api-key \"$KEY\""),
    "maps": Command(
        "finemoe.cli.maps", "FineMoE expert-map stores",
        "finemoe maps build --prompts prompts.jsonl --out maps.safetensors"),
    "bench": Command(
        "finemoe.cli.bench", "evaluate policies on held-out prompts (history from a build split; the plot extra)",
        "finemoe bench --prompts prompts.jsonl --policies finemoe,lru --expert-budget 25% --limit 32 --out bench-out"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the default of each flag that takes a value (unless it is None or empty, or the help already says
    it) and keeps the lines of descriptions and epilogs: a line that starts with a space (an example command) is
    kept as is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or action.default is None or action.default == []
                or action.default is argparse.SUPPRESS or "default" in text):
            return text
        return text + " (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(line if line.startswith(" ") else textwrap.fill(line, width, initial_indent=indent,
                                                                            subsequent_indent=indent)
                         for line in text.splitlines())


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: the problem and where the flags are listed, not the whole usage. Each
    parser records itself as the namespace's `usage_parser`, so the innermost command's parser is the one that
    reports arguments nobody recognised."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(usage_parser=self)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the flags)\n")


def _epilog(cmd: Command) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in cmd.example.splitlines())


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. Every command is listed; only the one `argv` names gets its flags (its module imported)."""
    parser = Parser(prog="finemoe", description=__doc__.split("\n")[0], formatter_class=HelpFormatter,
                    epilog="`finemoe COMMAND --help` lists a command's flags, with an example.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    first = next((a for a in argv or [] if not a.startswith("-")), None)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.summary, description=cmd.summary, epilog=_epilog(cmd),
                           formatter_class=HelpFormatter)
        if name == first:
            importlib.import_module(cmd.module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, unknown = build_parser(argv).parse_known_args(argv)
    usage_parser = args.__dict__.pop("usage_parser")
    if unknown:
        usage_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except FineMoEError as e:
        print(f"finemoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

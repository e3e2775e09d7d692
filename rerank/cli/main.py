"""The `rerank` command line: one subcommand module per area, beside this file."""

from __future__ import annotations

import argparse
import importlib
import sys

from rerank.cli.errors import CommandError

# Each module defines `register(subparsers)`, which adds its subcommand(s) and sets
# `func` on the parser to a callable taking the parsed args and returning an exit code.
COMMAND_MODULES = ("data", "train", "evaluate", "up", "bench", "replay", "model", "simulate", "sink", "experiment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rerank", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"rerank.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as err:
        print(f"rerank {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

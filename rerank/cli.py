"""The `rerank` command line: one subcommand module per area, under rerank/commands/."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `register(subparsers)`, which adds its subcommand(s) and sets
# `func` on the parser to a callable taking the parsed args and returning an exit code.
COMMAND_MODULES = ("data", "train", "evaluate", "up", "bench", "replay", "model", "simulate", "sink", "experiment")


class CommandError(Exception):
    """A user-facing error: printed as one line on stderr, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rerank", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"rerank.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"rerank.commands.{name}":
                raise
            continue  # not built yet
        module.register(sub)
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

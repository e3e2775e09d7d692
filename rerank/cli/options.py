"""Command-line options shared by several subcommands."""

from __future__ import annotations

import argparse
import os


def add_api_key_argument(parser: argparse.ArgumentParser) -> None:
    """--api-key KEY: the key a client subcommand sends (see `api_key`)."""
    parser.add_argument("--api-key", default=None,
                        help="send 'Authorization: Bearer KEY' (default: $RERANK_API_KEY when set)")


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key when given, else $RERANK_API_KEY; None when neither is set (or it is empty)."""
    return args.api_key if args.api_key is not None else os.environ.get("RERANK_API_KEY") or None

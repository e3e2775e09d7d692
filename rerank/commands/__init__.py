"""Subcommands of the `rerank` CLI; each module has `register(subparsers)`."""

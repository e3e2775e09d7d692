"""`rerank train`: fit a model on a dataset directory and save a model directory."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rerank.cli.errors import CommandError

MODEL_CHOICES = ("sasrec", "hybrid", "mf", "itemknn", "pop")

# convenience flags -> option names passed to Recommender.create (None = not given)
CONVENIENCE_FLAGS = ("epochs", "max_minutes", "device", "batch_size", "lr")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model and save it to a model directory",
        description="Train a model on the training part of the leave-one-out split of a dataset "
        "directory (validation targets for early stopping; test targets never seen) and save it.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="dataset directory (rerank data import)")
    p.add_argument("--model", required=True, choices=MODEL_CHOICES, help="model kind")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write (replaced atomically)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--epochs", type=int, help="training epochs (models that iterate)")
    p.add_argument("--max-minutes", type=float, help="wall-clock training budget in minutes")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (models that use torch)")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any model option, e.g. --set neighbours=200 (repeatable; values parsed as JSON, else text)")
    p.add_argument("--no-eval", action="store_true", help="skip the validation metrics in the summary")
    p.add_argument("--quiet", action="store_true", help="do not echo training-log records to stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_train)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings -> options; values parsed as JSON (3, 0.5, true, "x"), else kept as text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CommandError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def run_train(args: argparse.Namespace) -> int:
    from rerank.models.train import TrainSetupError, train

    options = {name: getattr(args, name) for name in CONVENIENCE_FLAGS if getattr(args, name) is not None}
    options.update(parse_overrides(args.set))
    try:
        _, summary = train(args.model, args.data, args.out, seed=args.seed,
                           evaluate_valid=not args.no_eval, echo=not args.quiet, **options)
    except TrainSetupError as err:
        raise CommandError(str(err)) from None
    except ModuleNotFoundError as err:
        raise CommandError(f"model {args.model!r} is not available: {err}") from None
    if args.json:
        print(json.dumps(summary))
    else:
        line = f"trained {summary['kind']} in {summary['train_seconds']:.1f}s -> {summary['out']}"
        if "valid" in summary:
            v = summary["valid"]
            line += f"; valid HR@10 {v['hr@10']:.4f} NDCG@10 {v['ndcg@10']:.4f} ({v['users']} users)"
        print(line)
    return 0

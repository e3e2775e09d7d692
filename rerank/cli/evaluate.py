"""`rerank evaluate`: leave-one-out full-ranking metrics of one model, or a comparison of several."""

from __future__ import annotations

import argparse
import json
import time

from rerank.cli.errors import CommandError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate saved models (leave-one-out, full ranking)",
        description="Rank all items for every user from the prefix before the target, with the prefix "
        "items masked, and report HR@5/10/20, NDCG@5/10/20 and MRR.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="dataset directory the models were trained on")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="MODEL_DIR", help="one model directory")
    which.add_argument("--compare", nargs="+", metavar="MODEL_DIR", help="several model directories -> one table")
    p.add_argument("--split", choices=("test", "valid"), default="test", help="targets to evaluate (default test)")
    p.add_argument("--batch-size", type=int, default=512, help="users per scoring batch (default 512)")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of the metrics per model")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run_evaluate)


def _load_checked(path: str, dataset):
    """Load a model directory and check it was trained on this dataset's item catalogue."""
    from rerank.models.recommender import ModelLoadError, load_model, model_items

    try:
        model = load_model(path)
        items = model_items(path)
    except ModelLoadError as err:
        raise CommandError(str(err)) from None
    if model.n_items != dataset.n_items or items["item_id"].to_pylist() != dataset.items["item_id"].to_pylist():
        raise CommandError(
            f"{path}: trained on a different item catalogue ({model.n_items} items) than {dataset.path} "
            f"({dataset.n_items} items)"
        )
    return model


def run_evaluate(args: argparse.Namespace) -> int:
    from rerank.data.dataset import DatasetError, leave_one_out, load_dataset
    from rerank.models.evaluate import evaluate, format_table, plot_comparison

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        dataset = load_dataset(args.data)
    except DatasetError as err:
        raise CommandError(str(err)) from None
    split = leave_one_out(dataset)
    if len(split.users) == 0:
        raise CommandError(f"{args.data}: no user has 3 or more events; nothing to evaluate")
    paths = [args.model] if args.model else args.compare
    models = [(path, _load_checked(path, dataset)) for path in paths]  # fail fast, before any scoring
    rows = []
    for path, model in models:
        start = time.monotonic()
        metrics = evaluate(model, dataset, split, which=args.split, batch_size=args.batch_size, progress=True)
        rows.append({"model": path, "kind": model.kind, "split": args.split, **metrics,
                     "seconds": round(time.monotonic() - start, 2)})
    if args.plot:
        plot_comparison(rows, args.plot)
    if args.json:
        print(json.dumps(rows[0] if args.model else rows))
    else:
        print(f"{dataset.meta.get('name', args.data)}: {args.split} split, {rows[0]['users']} users, full ranking")
        print(format_table(rows, [c for c in rows[0] if c not in ("model", "kind", "split", "users")]))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0

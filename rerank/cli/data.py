"""`rerank data import` and `rerank data synth`: build dataset directories."""

from __future__ import annotations

import argparse
import json

from rerank.cli.errors import CommandError

FORMATS = ("sasrec", "recbole", "events")


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="import datasets and generate the synthetic shop")
    sub = data.add_subparsers(dest="data_command", required=True)

    imp = sub.add_parser(
        "import",
        help="import a dataset into a dataset directory",
        description="Import SASRec sequence files, RecBole atomic files or a shop event log (CSV/Parquet).",
    )
    imp.add_argument("source", help="sequences .txt (sasrec), .inter file (recbole), or events .csv/.parquet (events)")
    imp.add_argument("--format", required=True, choices=FORMATS, help="source format")
    imp.add_argument("--item-attributes", metavar="JSON", help="sasrec: {item_id: [attribute ids]} JSON file")
    imp.add_argument("--items", metavar="ITEM_FILE", help="recbole: .item file whose token columns become attributes")
    imp.add_argument("--out", required=True, help="dataset directory to write (replaced atomically)")
    imp.add_argument("--json", action="store_true", help="print the summary as JSON")
    imp.set_defaults(func=run_import)

    syn = sub.add_parser(
        "synth",
        help="generate the synthetic demo shop",
        description="Generate a synthetic shop event stream (categories, Zipf popularity, drifting "
        "interests, sessions, a view->click->cart->purchase funnel and a planted sequential pattern).",
    )
    syn.add_argument("--out", required=True, help="dataset directory to write")
    syn.add_argument("--users", type=int, default=2000, help="number of users (default 2000)")
    syn.add_argument("--items", type=int, default=1000, help="number of items (default 1000)")
    syn.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same data")
    syn.add_argument("--json", action="store_true", help="print the summary as JSON")
    syn.set_defaults(func=run_synth)


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    print(
        f"wrote {summary['out']}: {summary['n_users']} users, {summary['n_items']} items, "
        f"{summary['n_events']} events, {summary['n_attributes']} attributes ({summary['source_format']})"
    )


def run_import(args: argparse.Namespace) -> int:
    from rerank.data import importers
    from rerank.data.dataset import DatasetError

    if args.item_attributes and args.format != "sasrec":
        raise CommandError("--item-attributes applies to --format sasrec only")
    if args.items and args.format != "recbole":
        raise CommandError("--items applies to --format recbole only")
    try:
        if args.format == "sasrec":
            summary = importers.import_sasrec(args.source, args.out, item_attributes=args.item_attributes)
        elif args.format == "recbole":
            summary = importers.import_recbole(args.source, args.out, items=args.items)
        else:
            summary = importers.import_events(args.source, args.out)
    except (importers.DataImportError, DatasetError) as err:
        raise CommandError(str(err)) from None
    _report(summary.as_dict(), args.json)
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from rerank.data import synth
    from rerank.data.dataset import DatasetError

    if args.users < 1 or args.items < 10:
        raise CommandError(f"--users must be >= 1 and --items >= 10, got {args.users} and {args.items}")
    config = synth.SynthConfig(n_users=args.users, n_items=args.items, seed=args.seed)
    try:
        summary = synth.write_synth(args.out, config)
    except DatasetError as err:
        raise CommandError(str(err)) from None
    _report(summary, args.json)
    return 0

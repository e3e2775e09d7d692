"""`rerank replay`: stream a dataset's events into a running service's POST /events."""

from __future__ import annotations

import json

from rerank.cli.errors import CommandError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "replay", help="replay a dataset's events into POST /events in timestamp order",
        description="Send a dataset's events, in timestamp order and batched, to URL/events at a fixed "
        "rate or a multiple of the dataset's clock; prints a summary (sent, accepted, duplicates, "
        "errors, achieved rate).")
    p.add_argument("--data", required=True, help="dataset directory (rerank data import/synth)")
    p.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
    pace = p.add_mutually_exclusive_group(required=True)
    pace.add_argument("--rate", type=float, metavar="EV_PER_S", help="fixed rate in events per second")
    pace.add_argument("--speed", type=float, metavar="X", help="X times the dataset's own clock")
    p.add_argument("--limit", type=int, help="send at most N events")
    p.add_argument("--offset", type=int, default=0, help="skip the first N events (time order)")
    p.add_argument("--batch", type=int, default=50, help="max events per request (default 50)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--max-gap", type=float, default=5.0, help="with --speed: cap silences at this many seconds")
    p.add_argument("--original-ts", action="store_true", help="send the dataset's timestamps (default: server time)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from rerank.data.dataset import DatasetError, load_dataset
    from rerank.clients.replay import ReplayConfig, replay

    for name in ("limit", "batch", "concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name}: expected a positive integer, got {value}")
    try:
        config = ReplayConfig(url=args.url.rstrip("/"), rate=args.rate, speed=args.speed, limit=args.limit,
                              offset=args.offset, batch=args.batch, concurrency=args.concurrency,
                              max_gap_s=args.max_gap, original_ts=args.original_ts, progress=True)
    except ValueError as err:
        raise CommandError(str(err)) from None
    try:
        dataset = load_dataset(args.data)
    except DatasetError as err:
        raise CommandError(str(err)) from None
    summary = replay(dataset, config).to_dict()
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"sent {summary['sent']}  accepted {summary['accepted']}  duplicates {summary['duplicates']}  "
              f"errors {summary['errors']}  rate {summary['achieved_rate']:.1f}/s in {summary['seconds']:.1f}s")
        for msg in summary["error_samples"]:
            print(f"  error: {msg}")
    return 1 if summary["errors"] and not summary["accepted"] else 0

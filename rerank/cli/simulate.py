"""`rerank simulate`: simulated shoppers of a synthetic shop use a running service (rerank.clients.simulate)."""

from __future__ import annotations

import json

from rerank.cli.errors import CommandError
from rerank.cli.options import add_api_key_argument, api_key


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="simulated users of a synthetic shop request rankings and click/buy by a known choice model",
        description="Users with drifting category interests, a successor preference and a position bias "
        "POST /rank with retrieved candidates, click / cart / buy on the answer and POST the events back "
        "(with request_id and position). Prints a summary per arm, with the ground-truth expected CTR.",
    )
    parser.add_argument("--url", required=True, help="base URL of the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--data", required=True, metavar="DIR", help="the synth dataset directory the service serves")
    parser.add_argument("--users", type=int, default=200, help="simulated users (default 200)")
    parser.add_argument("--requests", type=int, default=1000, help="total /rank requests (default 1000)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--rate", type=float, help="requests per second (default: as fast as answered)")
    parser.add_argument("--k", type=int, default=10, help="items per answer (default 10)")
    parser.add_argument("--candidates", type=int, default=100, help="candidates per request (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed; also names the users sim{seed}-N (default 0)")
    add_api_key_argument(parser)
    parser.add_argument("--post-views", action="store_true", help="also post a view event per examined item")
    parser.add_argument("--propensity-sd", type=float, default=0.0,
                        help="users differ in how much they click: per-user logit shift ~ Normal(0, SD) (default 0)")
    parser.add_argument("--drift-every", type=int, default=20,
                        help="a user's interests may drift every N of its requests, 0 = never (default 20)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request (default 10)")
    parser.add_argument("--new-successors", type=int, metavar="SEED",
                        help="simulate a changed shop: new successors for every item, drawn with SEED "
                        "(what online learning has to pick up)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run_simulate)


def _config(args):
    from rerank.clients.simulate import ChoiceModel, Drift, SimConfig

    for flag, value, low in (("--users", args.users, 1), ("--requests", args.requests, 0),
                             ("--concurrency", args.concurrency, 1), ("--k", args.k, 1),
                             ("--candidates", args.candidates, 1), ("--drift-every", args.drift_every, 0)):
        if value < low:
            raise CommandError(f"{flag} {value}: must be >= {low}")
    if args.propensity_sd < 0:
        raise CommandError(f"--propensity-sd {args.propensity_sd}: must be >= 0")
    if args.rate is not None and args.rate <= 0:
        raise CommandError(f"--rate {args.rate}: must be > 0")
    if not args.url.startswith(("http://", "https://")):
        raise CommandError(f"--url {args.url}: must start with http:// or https://")
    return SimConfig(
        url=args.url, n_users=args.users, requests=args.requests, concurrency=args.concurrency, rate=args.rate,
        k=args.k, n_candidates=args.candidates, seed=args.seed, api_key=api_key(args), post_views=args.post_views,
        drift=Drift(every=args.drift_every), timeout_s=args.timeout,
        choice=ChoiceModel(propensity_sd=args.propensity_sd),
    )


def _text(summary: dict) -> str:
    lines = [
        f"{summary['ok']}/{summary['requests']} requests ok in {summary['wall_s']} s ({summary['rate']} req/s), "
        f"{summary['degraded']} degraded, {summary['events_posted']} events posted, errors {summary['errors']}",
        f"/rank latency ms: {summary['latency_ms']}",
        f"{'arm':16} {'impr':>7} {'ctr':>7} {'exp_ctr':>7} {'exp_clk':>7} {'ideal':>7} {'buys':>6} {'revenue':>10}",
    ]
    for name, arm in summary["arms"].items():
        lines.append(f"{name:16} {arm['impressions']:>7} {arm['ctr']:>7.4f} {arm['expected_ctr']:>7.4f} "
                     f"{arm['expected_clicks']:>7.4f} {arm['ideal_expected_clicks']:>7.4f} "
                     f"{arm['purchases']:>6} {arm['revenue']:>10.2f}")
    return "\n".join(lines)


def run_simulate(args) -> int:
    from rerank.clients.simulate import ShopTruth, simulate

    cfg = _config(args)
    try:
        truth = ShopTruth.from_dataset(args.data)
        if args.new_successors is not None:
            truth = truth.with_new_successors(args.new_successors)
    except (OSError, ValueError, TypeError) as err:
        raise CommandError(f"--data {args.data}: {err}") from None
    summary = simulate(truth, cfg, progress=True)
    print(json.dumps(summary) if args.json else _text(summary))
    return 0 if summary["ok"] or not summary["requests"] else 1

"""`rerank bench`: /rank load at several concurrencies vs a no-op Serve deployment, as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rerank.commands.up import add_stack_arguments, stack_config

DEFAULT_OUT = Path("benchmarks/results/serving_bench.json")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="load-test /rank against a no-op deployment (JSON)",
        description="Drive POST /rank with C candidates at each concurrency, then the same load against "
        "the no-op deployment at /noop, and report req/s, p50/p90/p99, errors, mean scorer batch "
        "size and the pipeline/no-op throughput ratio. Starts the local stack unless --url is given.",
    )
    add_stack_arguments(parser)
    parser.add_argument("--url", help="benchmark a running service at this base URL (needs /noop deployed)")
    parser.add_argument("--candidates", type=int, default=200, help="candidates per request (default 200)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated list (default 1,8,32)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument("--requests", type=int, help="stop each run after this many requests")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"write the JSON here (default {DEFAULT_OUT})")
    parser.add_argument("--plot", type=Path, help="also save a latency/throughput plot (PNG)")
    parser.add_argument("--json", action="store_true", help="print the JSON on stdout (default: a short table)")
    parser.set_defaults(func=run_bench)


def _concurrencies(text: str) -> list[int]:
    from rerank.cli import CommandError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CommandError(f"--concurrency {text!r}: expected comma-separated integers, e.g. 1,8,32") from None
    if not values or min(values) < 1:
        raise CommandError(f"--concurrency {text!r}: expected positive integers")
    return values


def run_bench(args: argparse.Namespace) -> int:
    import os
    import platform
    import time

    from rerank.bench import CpuMeter, LoadConfig, compare, make_rank_bodies
    from rerank.cli import CommandError
    from rerank.dataset import load_dataset

    concurrencies = _concurrencies(args.concurrency)
    load_before = os.getloadavg()  # other users of the machine move the numbers
    if args.candidates < 1:
        raise CommandError(f"--candidates {args.candidates}: expected >= 1")
    stack = None
    if args.url:
        if args.data is None:
            raise CommandError("--url needs --data (the dataset whose users/items to request)")
        base, data = args.url.rstrip("/"), args.data
    else:
        from deployments.local import LocalStack

        stack = LocalStack(stack_config(args, with_noop=True)).start()
        base, data = stack.url, stack.data
    try:
        dataset = load_dataset(data)
        bodies = make_rank_bodies(list(dataset.user_ids[1:]), list(dataset.item_ids[1:]), args.candidates, args.k)
        config = LoadConfig(duration_s=args.duration, max_requests=args.requests)
        meter = CpuMeter() if stack is not None else None  # the stack runs as our child processes
        result = compare(f"{base}/rank", f"{base}/noop", bodies, concurrencies, config, cpu_meter=meter)
    finally:
        if stack is not None:
            stack.stop()
    result = {
        "bench": "serving",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before]},
        "settings": {"candidates": args.candidates, "k": args.k, "duration_s": args.duration,
                     "concurrencies": concurrencies, "data": str(data),
                     "throughput_optimized": not args.no_throughput_optimized,
                     "batch_wait_ms": args.batch_wait_ms, "max_batch": args.max_batch},
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        _plot(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'conc':>5} {'pipe req/s':>10} {'noop req/s':>10} {'ratio':>6} {'p50':>7} {'p99':>7} "
              f"{'batch':>6} {'err':>4} {'cpu ms/req pipe/noop':>21}")
        for run in result["runs"]:
            p, n = run["pipeline"], run["noop"]
            cpu = f"{p['server_cpu_ms_per_request']}/{n['server_cpu_ms_per_request']}"
            print(f"{run['concurrency']:>5} {p['requests_per_s']:>10} {n['requests_per_s']:>10} "
                  f"{run['throughput_ratio']!s:>6} {p['p50_ms']!s:>7} {p['p99_ms']!s:>7} "
                  f"{p['mean_scorer_batch_size']!s:>6} {p['errors']:>4} {cpu:>21}")
        print(f"written to {args.out}", file=sys.stderr)
    return 0


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in result["runs"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("pipeline", "noop"):
        left.plot(conc, [r[name]["requests_per_s"] for r in result["runs"]], marker="o", label=name)
        right.plot(conc, [r[name]["p99_ms"] or 0 for r in result["runs"]], marker="o", label=f"{name} p99")
    right.plot(conc, [r["pipeline"]["p50_ms"] or 0 for r in result["runs"]], marker="x", label="pipeline p50")
    left.set(xlabel="concurrency", ylabel="requests/s", xscale="log", title="throughput")
    right.set(xlabel="concurrency", ylabel="ms", xscale="log", title="latency")
    left.legend(), right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)

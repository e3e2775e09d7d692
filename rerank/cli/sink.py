"""`rerank sink`: persist the impressions and events streams to day-partitioned Parquet (rerank.eventlog.sink)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

from rerank.cli.errors import CommandError

PROGRESS_EVERY_S = 10.0


def register(subparsers) -> None:
    from rerank.store.keys import DEFAULT_PREFIX

    p = subparsers.add_parser(
        "sink", help="persist the impressions and events streams to Parquet, exactly once",
        description="Read {prefix}impressions and {prefix}events in consumer group 'sink' and write them to "
        "OUT/impressions/day=YYYY-MM-DD/*.parquet and OUT/events/day=.../*.parquet (unparseable entries: "
        "OUT/rejected/*.jsonl). Runs until Ctrl-C, printing a JSON line of counts every "
        f"{PROGRESS_EVERY_S:.0f} s on stderr, then the totals as JSON on stdout. Restarts are exactly-once. "
        "One sink per stream: while another sink (the app's EventSink, another `rerank sink`) holds the "
        "Redis lease {prefix}sink:lease this one stands by; --once waits for it up to --lease-ttl seconds.")
    p.add_argument("--redis-url", required=True, metavar="URL", help="Redis holding the streams")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"key prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--once", action="store_true", help="persist what the streams hold now, then exit")
    p.add_argument("--keep-days", type=int, metavar="N", help="delete day partitions older than N days")
    p.add_argument("--flush-every", type=float, default=5.0, metavar="S",
                   help="write a file per stream at most every S seconds (default 5; 0 = every pass)")
    p.add_argument("--lease-ttl", type=float, default=10.0, metavar="S",
                   help="the single-sink lease lapses S seconds after this sink stops renewing it (default 10)")
    p.set_defaults(func=run)


def _add(total: dict, counts: dict) -> None:
    for stream, by_name in counts.items():
        for name, n in by_name.items():
            total[stream][name] = total[stream].get(name, 0) + n


def _read_something(counts: dict) -> bool:
    return any(sum(by_name.values()) for by_name in counts.values())


def run(args) -> int:
    import redis

    from rerank.infra.redact import redact, safe_url
    from rerank.eventlog.sink import SinkConfig, StreamSink

    if args.flush_every < 0:
        raise CommandError(f"--flush-every: expected S >= 0, got {args.flush_every}")
    if args.keep_days is not None and args.keep_days < 0:
        raise CommandError(f"--keep-days: expected N >= 0, got {args.keep_days}")
    try:
        config = SinkConfig(redis_url=args.redis_url, prefix=args.prefix, out_dir=args.out, keep_days=args.keep_days,
                            flush_every_s=args.flush_every, lease_ttl_s=args.lease_ttl)
    except ValueError as err:
        raise CommandError(f"--lease-ttl: {err}") from None
    sink = StreamSink(config)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())  # finish the pass, then stop
    total: dict = {part.kind.name: {} for part in sink.parts}
    last_progress = standby_since = time.monotonic()
    was_standby = False
    try:
        while not stop.is_set():
            counts = sink.run_once(block_ms=0 if args.once else None, force=args.once)
            _add(total, counts)
            if sink.standby != was_standby:
                print(f"sink: another sink holds the lease {sink.lease.key}; standing by" if sink.standby
                      else f"sink: took the lease {sink.lease.key}", file=sys.stderr, flush=True)
                was_standby, standby_since = sink.standby, time.monotonic()
            if args.once and sink.standby:
                if time.monotonic() - standby_since > args.lease_ttl:
                    raise CommandError(f"another sink holds the lease {sink.lease.key} (one sink per stream); "
                                       "stop it, or retry once its lease lapses")
                time.sleep(0.1)
                continue
            if args.once and not _read_something(counts):
                break
            if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                print(json.dumps(total), file=sys.stderr, flush=True)
                last_progress = time.monotonic()
        if sink.lease_held:
            _add(total, sink.run_once(block_ms=0, force=True))  # what is still buffered
    except redis.RedisError as err:
        raise CommandError(f"redis {safe_url(args.redis_url)}: {redact(str(err), [args.redis_url])}") from None
    finally:
        signal.signal(signal.SIGINT, previous)
        sink.close()
    print(json.dumps(total))
    return 0

"""Freshness of `serve run serve_config.yaml`: event -> feature visible, event -> serving weights containing it.

    python benchmarks/freshness.py [--rate 200] [--seconds 30] [--publish-every 0.5] [--json]
    python benchmarks/freshness.py --url http://HOST:8000 --redis-url redis://... [--prefix rr:] --data DIR

By default it starts a real Redis and runs `serve run` on the shipped serve_config.yaml (the
app with its OnlineTrainer), overriding only the Redis URL, a fresh registry, the HTTP port and
the trainer's publish interval; with --url it measures a service that is already running (it
needs that service's Redis to map events to stream ids). Then it replays the demo shop's
events into POST /events at `--rate` events/s. Measured per event:
- feature visible: after its POST /events returned, how long until FeatureStore.fetch (the
  serving read path) returns the user's history ending with that item (sampled events, ms);
- serving weights: GET /model is polled every 50 ms; an event is in the served weights once
  the served version's trained_until_id >= the event's stream id; delay from the moment its
  POST /events returned (s). Events never served before the end count as not served.
Prints JSON and writes benchmarks/results/freshness.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rerank.infra.results import write_results  # noqa: E402
from rerank.infra.stats import percentile  # noqa: E402  (unrounded, in the unit of its input)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=200.0, help="replay rate, events/s (default 200)")
    p.add_argument("--seconds", type=float, default=30.0, help="replay duration (default 30)")
    p.add_argument("--publish-every", type=float, default=0.5, help="trainer publish interval s (default 0.5)")
    p.add_argument("--poll", type=float, default=0.2, help="scorer registry poll interval s (default 0.2)")
    p.add_argument("--sample-every", type=int, default=10, help="feature-visibility probe on every Nth batch")
    p.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    p.add_argument("--url", help="measure a running service instead of starting serve run (needs --redis-url)")
    p.add_argument("--redis-url", help="the running service's Redis (with --url)")
    p.add_argument("--prefix", default="rr:", help="the service's redis_prefix (default rr:)")
    p.add_argument("--data", type=Path, help="dataset whose events to replay (default: the demo shop)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "freshness.json"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from deployments.local import DEMO_DATA, DEMO_MODEL, ServeRun, ensure_demo_data, ensure_model, write_serve_config
    from rerank.store.keys import Keys
    from rerank.infra.child_process import free_port
    from rerank.infra.redis_server import EmbeddedRedis

    if args.url and not args.redis_url:
        p.error("--url needs --redis-url (events are matched to the stream ids the served versions report)")

    data = args.data or ensure_demo_data(DEMO_DATA)
    n_events = int(args.rate * args.seconds)
    result: dict = {"rate": args.rate, "seconds": args.seconds, "publish_every_s": args.publish_every,
                    "scorer_poll_s": args.poll, "command": " ".join(["python", *sys.argv])}
    work = Path(tempfile.mkdtemp(prefix="rerank-freshness-"))
    redis_server = served_app = None
    try:
        if args.url:
            url, redis_url = args.url.rstrip("/"), args.redis_url
        else:
            model = ensure_model(data, DEMO_MODEL)
            redis_server = EmbeddedRedis(data_dir=work / "redis").start()
            redis_url, port = redis_server.url, args.port or free_port()
            config = write_serve_config(work / "serve_config.yaml", {
                "model": str(model), "data": str(data), "redis_url": redis_url, "redis_prefix": args.prefix,
                "registry_uri": str(work / "registry"), "registry_poll_s": args.poll, "catalogue_refresh_s": 0,
                "online": {"publish_every_s": args.publish_every}}, port=port)
            served_app = ServeRun(config, log=work / "serve-run.log")
            url = f"http://127.0.0.1:{port}"
            print(f"freshness: serve run {config} (log {work / 'serve-run.log'}) ...", file=sys.stderr)
            served_app.wait_ready(url)
        result["service"] = {"url": url, "started": "serve run serve_config.yaml" if served_app else "given"}
        stream_key = Keys(args.prefix).events
        measure(args, result, url, redis_url, stream_key, data, n_events)
    finally:
        if served_app is not None:
            served_app.stop()
        if redis_server is not None:
            redis_server.close()
    write_results(args.out, result)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def measure(args, result: dict, url: str, redis_url: str, stream_key: str, data: Path, n_events: int) -> None:
    """Replay events into `url` and fill `result` with the visibility and serving delays."""
    import asyncio

    import httpx
    import redis

    from rerank.data.dataset import load_dataset
    from rerank.store.feature_store import FeatureStore
    from rerank.clients.replay import ReplayConfig, dataset_events, replay_async
    from rerank.store.stream import id_key

    dataset = load_dataset(data)
    events = dataset_events(dataset, offset=max(0, dataset.events.num_rows - n_events))
    by_id = {e["event_id"]: e for e in events}
    returned_at: dict[str, float] = {}
    visible_ms: list[float] = []
    store = FeatureStore(redis_url, prefix=args.prefix)
    item_idx = {str(i): k for k, i in enumerate(dataset.item_ids) if k}
    batches = [0]

    def on_batch(ids: list[str], t: float) -> None:
        for i in ids:
            returned_at[i] = t
        batches[0] += 1
        if batches[0] % args.sample_every == 0:  # probe the last event of this batch
            e = by_id[ids[-1]]
            want = item_idx.get(e["item_id"], -1)
            t0 = time.time()
            for _ in range(200):
                feats = store.fetch([(e["user_id"], None)])[0]
                if want in feats.history[-5:].tolist():  # later events of the user may follow it
                    visible_ms.append((time.time() - t0 + (t0 - t)) * 1000.0)
                    break
                time.sleep(0.001)

    served: list[tuple[float, str | None, str]] = []  # (time, trained_until_id, version)
    stop = threading.Event()

    def poll_model() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while not stop.is_set():
                try:
                    info = client.get("/model").json()
                    served.append((time.time(), info["meta"].get("trained_until_id"), info["version"]))
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                time.sleep(0.05)

    poller = threading.Thread(target=poll_model, daemon=True)
    poller.start()
    rc = ReplayConfig(url=url, rate=args.rate, batch=20, concurrency=8, progress=not args.json)
    summary = asyncio.run(replay_async(events, rc, on_batch))
    drain_until = time.time() + 15
    last_id = redis.Redis.from_url(redis_url, decode_responses=True).xrevrange(stream_key, count=1)
    last_id = last_id[0][0] if last_id else None

    while time.time() < drain_until and not (served and served[-1][1] and last_id
                                              and id_key(served[-1][1]) >= id_key(last_id)):
        time.sleep(0.1)
    stop.set()
    poller.join()
    with httpx.Client(base_url=url, timeout=10) as client:
        trainer = client.get("/healthz").json().get("trainer") or {}
        meta = client.get("/model").json().get("meta") or {}
    # event_id -> stream id
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stream_ids = {}
    for entry_id, fields in client.xrange(stream_key, count=len(events) + 1000):
        stream_ids[fields["event_id"]] = entry_id
    changes = []  # first time each trained_until_id was seen served
    seen = set()
    for t, until, version in served:
        if until and (until, version) not in seen:
            seen.add((until, version))
            changes.append((t, id_key(until)))
    delays, not_served = [], 0
    for eid, t_ret in returned_at.items():
        sid = stream_ids.get(eid)
        if sid is None:
            continue
        key = id_key(sid)
        hit = next((t for t, until in changes if until >= key and t >= t_ret - 1.0), None)
        if hit is None:
            not_served += 1
        else:
            delays.append(max(0.0, hit - t_ret))
    result.update({
        "replay": summary.to_dict(),
        "event_to_feature_visible_ms": {"p50": percentile(visible_ms, 50), "p99": percentile(visible_ms, 99),
                                        "n": len(visible_ms)},
        "event_to_serving_weights_s": {"p50": percentile(delays, 50), "p99": percentile(delays, 99),
                                       "n": len(delays), "not_served_by_end": not_served},
        "versions_served": len({v for _, _, v in served}),
        "trainer": {"state": trainer.get("state"), "lag_events": trainer.get("lag_events"),
                    **{k: meta.get(k) for k in ("events_applied", "events_trained", "versions_published",
                                                "guard_refusals")}},
        "load_average": os.getloadavg(),
    })


if __name__ == "__main__":
    sys.exit(main())

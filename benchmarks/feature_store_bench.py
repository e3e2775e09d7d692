"""Feature store and ranking speed against a real Redis server; prints JSON.

    python benchmarks/feature_store_bench.py [--data artifacts/data/beauty] [--redis-url URL]
        [--users 32] [--candidates 200] [--events 100] [--repeats 200] [--json] [--out FILE]

Loads the dataset into Redis (embedded server unless --redis-url / REDIS_URL), then times
    fetch        one FeatureStore.fetch of `users` random users x `candidates` random items
    write_events one FeatureStore.write_events of `events` events (random users and items)
    rank         rerank.serving.ranking.rank of 500 candidates -> 50: plain, MMR and DPP at diversity 0.3
and reports milliseconds (p50, p90, p99, mean) per call, plus the client process's CPU time
per call (p50): on a shared machine under load the wall clock mostly measures waiting. Without --data it imports Beauty
from ../shared/data into a temporary directory.

    python benchmarks/feature_store_bench.py --item-cache [--rates 50,200,800] [--duration 10]
        [--batch 8] [--candidates 200] [--zipf 1.0] [--ttl 1.0]

instead measures the replica's item cache (rerank.serving.item_cache) on the serving path,
FeatureFetcher.fetch, without and with the cache: /rank requests arrive at each rate (requests per
second, in batches of `batch`, paced: the cache's hit rate depends on how many requests a replica
sees per ttl_s), each with `candidates` distinct items drawn by a Zipf law of exponent `zipf` over
the items in the dataset's popularity order, and a uniformly drawn user. Reported per request:
Redis commands (INFO commandstats), bytes in/out of Redis (INFO stats total_net_input_bytes /
total_net_output_bytes; the INFO calls' own share subtracted) and the server's CPU time (INFO cpu),
the cache's hit rate, and per batch the fetch time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rerank.infra.results import write_results  # noqa: E402
from rerank.infra.stats import percentile  # noqa: E402  (in the unit of its input)


class Timer:
    """Wall-clock and this process's CPU time of each timed call (CPU time is what the client
    itself spent, which on a shared, loaded machine says more than the wall clock)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self) -> "Timer":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.process_time() - self._cpu)

    def summary(self) -> dict:
        return {**summary(self.wall), "client_cpu_p50_ms": round(percentile(self.cpu, 50) * 1000, 3)}


def summary(times_s: list[float]) -> dict:
    ms = np.asarray(times_s) * 1000.0
    return {
        "calls": len(ms),
        "p50_ms": percentile(ms, 50, digits=3),
        "p90_ms": percentile(ms, 90, digits=3),
        "p99_ms": percentile(ms, 99, digits=3),
        "mean_ms": round(float(ms.mean()), 3),
    }


def load_data(path: str | None, tmp: Path):
    from rerank.data.dataset import DatasetError, load_dataset

    if path:
        try:
            return load_dataset(path)
        except DatasetError as err:
            raise SystemExit(f"feature_store_bench: {err}") from None
    from rerank.data.importers import import_sasrec

    shared = REPO.parent / "shared" / "data" / "amazon-beauty"
    if not shared.is_dir():
        raise SystemExit(f"no --data given and {shared} is absent")
    import_sasrec(shared / "Beauty.txt", tmp / "beauty", shared / "Beauty_item2attributes.json")
    return load_dataset(tmp / "beauty")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "artifacts" / "data" / "beauty") if (REPO / "artifacts" / "data" / "beauty").is_dir() else None)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="JSON only: no progress bar (the output is JSON anyway)")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    parser.add_argument("--item-cache", action="store_true",
                        help="measure FeatureFetcher.fetch without and with the item cache instead (see above)")
    parser.add_argument("--rates", default="50,200,800", help="--item-cache: /rank requests per second, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="--item-cache: seconds per rate and variant")
    parser.add_argument("--batch", type=int, default=8, help="--item-cache: requests per fetch")
    parser.add_argument("--zipf", type=float, default=1.0, help="--item-cache: exponent of the candidates' Zipf law")
    parser.add_argument("--ttl", type=float, default=1.0, help="--item-cache: the cache's ttl_s")
    args = parser.parse_args(argv)
    if args.item_cache:
        return item_cache_main(args)

    from rerank.store.events import Event
    from rerank.store.feature_store import FeatureStore
    from rerank.serving.ranking import RankingRules, rank
    from rerank.infra.redis_server import find_redis_server_binary, resolve_redis

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="fs-bench-") as tmp:
        dataset = load_data(args.data, Path(tmp))
        url, server = resolve_redis(args.redis_url, data_dir=Path(tmp) / "redis")
        try:
            store = FeatureStore(url, prefix="bench:")
            load = store.bulk_load(dataset, progress=not args.json)
            user_ids, item_ids = dataset.user_ids, dataset.item_ids

            fetch_timer = Timer()
            for _ in range(args.repeats):
                users = rng.integers(1, dataset.n_users + 1, args.users)
                requests = [
                    (user_ids[u], item_ids[rng.integers(1, dataset.n_items + 1, args.candidates)].tolist())
                    for u in users
                ]
                with fetch_timer:
                    store.fetch(requests)

            write_timer = Timer()
            for _ in range(args.repeats):
                events = [
                    Event(user_ids[u], item_ids[i], t)
                    for u, i, t in zip(
                        rng.integers(1, dataset.n_users + 1, args.events),
                        rng.integers(1, dataset.n_items + 1, args.events),
                        rng.choice(["view", "click", "cart", "purchase"], args.events),
                    )
                ]
                with write_timer:
                    store.write_events(events)

            variants = {"plain": (0.0, "mmr"), "mmr_0.3": (0.3, "mmr"), "dpp_0.3": (0.3, "dpp")}
            rank_timers = {name: Timer() for name in variants}
            attrs = dataset.item_attributes
            for _ in range(args.repeats):
                idx = rng.choice(np.arange(1, dataset.n_items + 1), 500, replace=False)
                ids = item_ids[idx].tolist()
                scores = rng.normal(size=500)
                for name, (diversity, method) in variants.items():
                    rules = RankingRules(k=50, diversity=diversity, diversity_method=method)
                    with rank_timers[name]:
                        rank(ids, idx, scores, rules=rules,
                             purchased_idx=idx[:5], attributes=attrs[idx], popularity=rng.random(500))
            store._redis.delete(store.keys.events)
        finally:
            if server is not None:
                server.close()

    report = {
        "benchmark": "feature_store",
        "dataset": str(dataset.path.name),
        "redis": url if server is None else f"embedded ({find_redis_server_binary()})",
        "bulk_load": load,
        f"fetch_{args.users}x{args.candidates}": fetch_timer.summary(),
        f"write_events_{args.events}": write_timer.summary(),
        "write_events_per_s": round(args.events * len(write_timer.wall) / sum(write_timer.wall)),
        "rank_500_to_50": {name: t.summary() for name, t in rank_timers.items()},
        "load_average": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        write_results(args.out, report)
    return 0


COUNTERS = ("net_in_bytes", "net_out_bytes", "server_cpu_us")  # redis_counters' entries that are not commands


def redis_counters(client) -> dict:
    """Server-wide command calls (by command, INFO commandstats), network bytes (INFO stats) and
    the server's CPU time (INFO cpu)."""
    commands = client.info("commandstats")
    stats = client.info("stats")
    out = {name.removeprefix("cmdstat_"): value["calls"] for name, value in commands.items()}
    out["net_in_bytes"] = stats["total_net_input_bytes"]
    out["net_out_bytes"] = stats["total_net_output_bytes"]
    cpu = client.info("cpu")
    out["server_cpu_us"] = round((cpu["used_cpu_user"] + cpu["used_cpu_sys"]) * 1e6)
    return out


def counter_delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after) if after.get(k, 0) != before.get(k, 0)}


def zipf_requests(rng, dataset, n: int, candidates: int, exponent: float) -> list[tuple[str, list[str]]]:
    """`n` (user, candidates) pairs: users uniform, `candidates` distinct items each drawn with
    P(item of popularity rank r) ~ 1 / r**exponent (popularity: the item's events in the dataset)."""
    counts = np.bincount(dataset.events["item_idx"].to_numpy(), minlength=dataset.n_items + 1)[1:]
    by_popularity = np.argsort(-counts, kind="stable") + 1  # item_idx, most popular first
    weights = 1.0 / np.arange(1, dataset.n_items + 1) ** exponent
    weights /= weights.sum()
    item_ids, user_ids = dataset.item_ids, dataset.user_ids
    out = []
    for user in rng.integers(1, dataset.n_users + 1, n):
        picked = by_popularity[rng.choice(dataset.n_items, candidates, replace=False, p=weights)]
        out.append((str(user_ids[user]), [str(i) for i in item_ids[picked]]))
    return out


def run_paced(fetcher, requests, batch: int, rate: float, client) -> dict:
    """Fetch `requests` in batches of `batch`, batch k starting at k * batch / rate seconds."""
    timer = Timer()
    overhead = counter_delta(redis_counters(client), redis_counters(client))  # one snapshot's own share
    before = redis_counters(client)
    start = time.perf_counter()
    for k, first in enumerate(range(0, len(requests), batch)):
        wait = start + k * batch / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        with timer:
            fetcher.fetch(requests[first : first + batch])
    elapsed = time.perf_counter() - start
    delta = counter_delta(before, redis_counters(client))
    for k, v in overhead.items():
        delta[k] = delta.get(k, 0) - v
    delta.pop("info", None)
    n = len(requests)
    commands = {k: v for k, v in delta.items() if k not in COUNTERS}
    return {
        "requests": n,
        "achieved_rate": round(n / elapsed, 1),
        "per_request": {
            "redis_commands": round(sum(commands.values()) / n, 3),
            "by_command": {k: round(v / n, 3) for k, v in sorted(commands.items())},
            "bytes_to_redis": round(delta.get("net_in_bytes", 0) / n),
            "bytes_from_redis": round(delta.get("net_out_bytes", 0) / n),
            "redis_cpu_us": round(delta.get("server_cpu_us", 0) / n, 1),  # INFO cpu: the server's user + sys
        },
        f"fetch_{batch}x": timer.summary(),
    }


def item_cache_main(args) -> int:
    from types import SimpleNamespace

    import redis

    from rerank.infra.redis_server import find_redis_server_binary, resolve_redis
    from rerank.serving.catalogue import Catalogue
    from rerank.serving.item_cache import ItemCache
    from rerank.serving.pipeline import FeatureFetcher
    from rerank.store.feature_store import FeatureStore

    rates = [float(r) for r in args.rates.split(",")]
    rng = np.random.default_rng(args.seed)
    points = []
    with tempfile.TemporaryDirectory(prefix="fs-bench-") as tmp:
        dataset = load_data(args.data, Path(tmp))
        url, server = resolve_redis(args.redis_url, data_dir=Path(tmp) / "redis")
        try:
            store = FeatureStore(url, prefix="bench:")
            store.bulk_load(dataset, progress=not args.json)
            client = redis.Redis.from_url(url)
            catalogue = SimpleNamespace(current=Catalogue(*store.catalogue()))  # what FeatureFetcher reads
            for rate in rates:
                requests = zipf_requests(rng, dataset, max(args.batch, int(rate * args.duration)), args.candidates,
                                         args.zipf)
                point: dict = {"rate": rate}
                for name, cache in (("no_cache", None), ("item_cache", ItemCache(ttl_s=args.ttl))):
                    fetcher = FeatureFetcher(store, catalogue, item_cache=cache)
                    point[name] = run_paced(fetcher, requests, args.batch, rate, client)
                    if cache is not None:
                        stats = cache.stats()
                        looked_up = stats["hits"] + stats["misses"] + stats["expired"]
                        point[name]["cache"] = {**stats, "hit_rate": round(stats["hits"] / max(looked_up, 1), 4)}
                points.append(point)
            client.close()
            store.close()
        finally:
            if server is not None:
                server.close()
    report = {
        "benchmark": "feature_store_item_cache",
        "dataset": str(dataset.path.name),
        "n_items": dataset.n_items,
        "n_users": dataset.n_users,
        "redis": url if server is None else f"embedded ({find_redis_server_binary()})",
        "candidates": args.candidates,
        "batch": args.batch,
        "zipf": args.zipf,
        "ttl_s": args.ttl,
        "duration_s": args.duration,
        "points": points,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

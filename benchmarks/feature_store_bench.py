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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())

"""Floods: Redis state and the online trainer stay bounded under floods; prints JSON.

    python benchmarks/floods.py [--scale 1] [--maxmemory 512mb] [--anon-seconds 540]
        [--only new_items,anonymous_events,impressions] [--out benchmarks/results/floods.json]

Each scenario runs on its own fresh real redis-server (rerank.infra.redis_server.EmbeddedRedis:
maxmemory + noeviction, no append-only file) and, for new items, the real trainer loop
(rerank.online.loop.OnlineLoop over a temporary registry holding a tiny trained SASRec); no Ray.
- new_items: events naming distinct new item ids through FeatureStore.write_events_detailed with
  item_capacity = model items + allowance (as deployments/app.py sets it); then the OnlineLoop,
  in its own process, over the resulting stream: its RSS, embedding rows, published version size.
- anonymous_events: events without event_id for existing items (time-capped by --anon-seconds):
  stream XLEN, `evt:*` markers, user sequences, bought sets.
- impressions: rerank.experiments.attribution.ImpressionLog.record: stream XLEN, per-user lists `u:*:imps` and
  hashes `u:*:shown` (each user gets ~impressions / impression_users = 2 x recent_per_user, so
  used_memory plateaus once every user is full), and the projected plateau per 100 k users.
used_memory is sampled ~20 times per scenario. `--scale` multiplies every count and cap (not
the batch size). Writes the JSON and a PNG (used_memory over events) next to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # online_helpers.tiny_model_dir: the tiny trained model

from benchmarks.common import scenario_list  # noqa: E402
from rerank.infra.progress import progress_bar  # noqa: E402
from rerank.store.errors import FeatureStoreUnavailable  # noqa: E402
from rerank.store.events import Event  # noqa: E402
from rerank.store.feature_store import FeatureStore  # noqa: E402
from rerank.store.keys import Keys  # noqa: E402

SCENARIOS = ("new_items", "anonymous_events", "impressions")
TYPES = np.array(["view", "click", "cart", "purchase"])
TYPE_P = [0.7, 0.2, 0.07, 0.03]
SAMPLES = 20  # used_memory samples per scenario
MB = 2**20


@dataclass(frozen=True)
class Sizes:
    """Counts and caps at scale 1."""

    new_item_events: int = 1_000_000
    new_item_allowance: int = 50_000
    new_item_users: int = 10_000
    stream_maxlen: int = 1_000_000  # FeatureStoreConfig's default
    train_entries: int = 200_000  # the trainer reads this many of the oldest entries (all the admitted items)
    anon_events: int = 10_000_000
    anon_users: int = 100_000
    anon_items: int = 10_000
    anon_stream_maxlen: int = 200_000  # the default 1 M entries (~0.5 GB) + 100 k full users exceed 512 MB
    impressions: int = 1_000_000
    impression_users: int = 25_000  # 40 impressions each: 2 x recent_per_user, so every user fills up
    impressions_maxlen: int = 100_000
    impression_items: int = 10  # items per shown list
    batch: int = 1000

    def scaled(self, scale: float) -> "Sizes":
        """Every count and cap times `scale` (at least 1); the batch size stays."""
        return replace(self, **{f.name: max(1, round(getattr(self, f.name) * scale))
                                for f in fields(self) if f.name != "batch"})


# ---------------------------------------------------------------- measuring
def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def sample(client: redis.Redis, stream: str, events: int, t0: float) -> dict:
    """One point of the used_memory curve."""
    return {"events": events, "s": round(time.perf_counter() - t0, 2), "used_memory": used_memory(client),
            "xlen": int(client.xlen(stream)), "dbsize": int(client.dbsize())}


def memory_summary(client: redis.Redis) -> dict:
    info = client.info("memory")
    return {k: int(info[k]) for k in ("used_memory", "used_memory_peak", "used_memory_rss", "maxmemory")}


def scan_keys(client: redis.Redis, pattern: str) -> list[bytes]:
    return list(client.scan_iter(match=pattern, count=10_000))


def lengths(client: redis.Redis, keys: list[bytes], command: str) -> list[int]:
    """LLEN / SCARD / HLEN of each key, pipelined."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        getattr(pipe, command)(key)
    return [int(n) for n in pipe.execute()]


def mean_usage(client: redis.Redis, keys: list[bytes], n: int = 200) -> float | None:
    """Mean MEMORY USAGE (bytes, all samples) of the first `n` keys."""
    sizes = [client.memory_usage(k, samples=0) or 0 for k in keys[:n]]
    return round(float(np.mean(sizes)), 1) if sizes else None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Flood:
    """Progress, rate and used_memory curve of one scenario's write loop."""

    def __init__(self, client: redis.Redis, stream: str, total: int, name: str, progress: bool):
        self.client, self.stream, self.total = client, stream, total
        self.every = max(1, total // SAMPLES)
        self.done = 0
        self.t0 = time.perf_counter()
        self.curve = [sample(client, stream, 0, self.t0)]
        self.bar = progress_bar(total=total, desc=name, unit="ev", unit_scale=True, enabled=progress)
        self.oom: dict | None = None

    def add(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        self.bar.update(n)
        if self.done // self.every > before // self.every or self.done == self.total:
            self.curve.append(sample(self.client, self.stream, self.done, self.t0))

    def refused(self, err: Exception) -> None:
        """Redis refused a batch (OOM under noeviction): the flood stops there."""
        self.oom = {"events": self.done, "error": str(err)[:300]}

    def close(self) -> dict:
        self.bar.close()
        if self.curve[-1]["events"] != self.done:
            self.curve.append(sample(self.client, self.stream, self.done, self.t0))
        seconds = time.perf_counter() - self.t0
        return {"events": self.done, "seconds": round(seconds, 1), "events_per_s": round(self.done / seconds),
                "stopped_by_oom": self.oom, "curve": self.curve}


# ---------------------------------------------------------------- new items + the trainer
def flood_new_items(url: str, sizes: Sizes, model_items: int, progress: bool = True) -> dict:
    """Distinct new item ids through write_events_detailed with item_capacity = model items + allowance."""
    capacity = model_items + sizes.new_item_allowance
    store = FeatureStore(url, socket_timeout_s=30, item_capacity=capacity, stream_maxlen=sizes.stream_maxlen)
    store.ensure_item_floor(model_items)  # as deployments/app.py prepare_store does
    client = redis.Redis.from_url(url)
    flood = Flood(client, store.keys.events, sizes.new_item_events, "new_items", progress)
    admitted = refused = 0
    for lo in range(0, sizes.new_item_events, sizes.batch):
        ids = range(lo, min(lo + sizes.batch, sizes.new_item_events))
        try:
            result = store.write_events_detailed(
                [Event(f"fu{i % sizes.new_item_users}", f"new-{i}", "view") for i in ids])
        except FeatureStoreUnavailable as err:
            flood.refused(err)
            break
        admitted += result.new_items
        refused += result.over_capacity
        flood.add(len(ids))
    keys = store.keys
    catalogue = {name: {"hlen": int(client.hlen(key)), "bytes": int(client.memory_usage(key, samples=0) or 0)}
                 for name, key in (("item_idx", keys.item_idx), ("item_id", keys.item_id),
                                   ("item_stats", keys.item_stats))}
    out = {"item_capacity": capacity, "model_items": model_items, "allowance": sizes.new_item_allowance,
           "items_admitted": admitted, "events_refused_item": refused,
           "next_item_idx": int(client.get(keys.next_item_idx) or 0), "new_item_room": store.new_item_room(),
           "catalogue": catalogue, "xlen": int(client.xlen(keys.events)),
           "stream_maxlen": sizes.stream_maxlen, "memory": memory_summary(client), **flood.close()}
    store.close()
    client.close()
    return out


def train_on_stream(url: str, stream: str, model_dir: str, registry_dir: str, max_entries: int,
                    progress: bool = True, max_items: int = 0) -> dict:
    """The OnlineLoop (app defaults, with the app's `max_items`: the store's item capacity) over up
    to `max_entries` stream entries; sizes it ends with."""
    import psutil
    import torch

    from rerank.online.config import OnlineConfig
    from rerank.online.loop import OnlineLoop
    from rerank.models.registry import ModelRegistry
    from rerank.models.sequential import WEIGHTS_FILE
    from rerank.store.stream import EventStream, StreamConfig

    torch.set_num_threads(1)  # as the app's OnlineTrainer (torch_threads=1)
    registry = ModelRegistry(registry_dir)
    registry.publish_dir(model_dir)
    loop = OnlineLoop(EventStream(StreamConfig(url=url, stream=stream, consumer="flood", block_ms=10)),
                      registry, OnlineConfig(max_items=max_items))
    rss_start = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    loop.start()
    bar = progress_bar(total=max_entries, desc="trainer", unit="entry", unit_scale=True, enabled=progress)
    read = 0
    while read < max_entries:
        n = loop.poll_once(block_ms=10)
        if n == 0:
            break
        read += n
        bar.update(n)
    bar.close()
    loop.checkpoint()
    model = loop.trainer.model
    latest = registry.latest()
    version_dir = registry.local_dir(latest)
    return {"entries_read": read, "seconds": round(time.perf_counter() - t0, 1),
            "stats": {k: v for k, v in loop.stats.to_dict().items() if k != "last_guard"},
            "n_items": int(model.n_items), "table_rows": int(model.module.item_emb.weight.shape[0]),
            "weights_item_capacity": int(model.module.config.item_capacity),
            "rss_start_mb": round(rss_start / MB, 1), "rss_end_mb": round(psutil.Process().memory_info().rss / MB, 1),
            "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "published_version": latest, "published_version_bytes": dir_bytes(version_dir),
            "published_weights_bytes": (version_dir / WEIGHTS_FILE).stat().st_size,
            "registry_versions": len(registry.versions()), "registry_bytes": dir_bytes(Path(registry_dir))}


def run_trainer(url: str, stream: str, model_dir: Path, registry_dir: Path, max_entries: int,
                progress: bool = True, max_items: int = 0) -> dict:
    """train_on_stream in its own process (its RSS is the trainer's alone, as the app's replica)."""
    spec = {"url": url, "stream": stream, "model_dir": str(model_dir), "registry_dir": str(registry_dir),
            "max_entries": max_entries, "progress": progress, "max_items": max_items}
    proc = subprocess.run([sys.executable, __file__, "--trainer-json", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def new_items_scenario(url: str, sizes: Sizes, model_dir: Path, work: Path, progress: bool = True) -> dict:
    """The new-item flood, then the trainer over the oldest `train_entries` of the stream it left."""
    from rerank.models.recommender import read_config

    model_items = int(read_config(model_dir)["n_items"])
    out = flood_new_items(url, sizes, model_items, progress)
    out["stream_trimmed"] = out["xlen"] < out["events"]
    entries = min(out["xlen"], sizes.train_entries)
    cap = out["item_capacity"]
    trainer = run_trainer(url, Keys().events, model_dir, work / "registry", entries, progress, max_items=cap)
    trainer["n_items_within_capacity"] = trainer["n_items"] <= cap
    trainer["table_rows_over_capacity"] = round(trainer["table_rows"] / (cap + 1), 3)
    out["trainer"] = trainer
    return out


# ---------------------------------------------------------------- anonymous events
def random_events(rng: np.random.Generator, n: int, users: int, item_ids: list[str]) -> list[Event]:
    us = rng.integers(users, size=n)
    items = rng.integers(len(item_ids), size=n)
    types = TYPES[rng.choice(len(TYPES), size=n, p=TYPE_P)]
    return [Event(f"au{u}", item_ids[i], str(t)) for u, i, t in zip(us, items, types)]


def anonymous_scenario(url: str, sizes: Sizes, seconds: float, progress: bool = True) -> dict:
    """Events without event_id for existing items, until `anon_events` or `seconds` run out."""
    store = FeatureStore(url, socket_timeout_s=30, stream_maxlen=sizes.anon_stream_maxlen)
    client = redis.Redis.from_url(url)
    item_ids = [f"item-{k}" for k in range(sizes.anon_items)]
    for lo in range(0, len(item_ids), sizes.batch):  # make every item exist first
        store.write_events([Event("warmup", i, "view") for i in item_ids[lo : lo + sizes.batch]])
    rng = np.random.default_rng(0)
    flood = Flood(client, store.keys.events, sizes.anon_events, "anonymous_events", progress)
    deadline = time.monotonic() + seconds
    while flood.done < sizes.anon_events and time.monotonic() < deadline:
        n = min(sizes.batch, sizes.anon_events - flood.done)
        try:
            store.write_events(random_events(rng, n, sizes.anon_users, item_ids))
        except FeatureStoreUnavailable as err:
            flood.refused(err)
            break
        flood.add(n)
    out = {"stream_maxlen": sizes.anon_stream_maxlen, "users": sizes.anon_users, "items": sizes.anon_items,
           "max_history": store.config.max_history, "time_capped": flood.done < sizes.anon_events,
           **_anonymous_state(client, store), "memory": memory_summary(client), **flood.close()}
    store.close()
    client.close()
    return out


def _anonymous_state(client: redis.Redis, store: FeatureStore) -> dict:
    """Markers, user sequences, bought sets, the stream, and what the default caps would take."""
    keys = store.keys
    seqs, bought = scan_keys(client, keys.user_seq("*")), scan_keys(client, keys.user_bought("*"))
    seq_len, bought_len = lengths(client, seqs, "llen"), lengths(client, bought, "zcard")
    xlen = int(client.xlen(store.keys.events))
    stream_bytes = int(client.memory_usage(store.keys.events, samples=0) or 0)
    full = [k for k, n in zip(seqs, seq_len) if n == store.config.max_history]
    per_full_user = mean_usage(client, full) or mean_usage(client, seqs)
    per_entry = stream_bytes / max(1, xlen)
    return {
        "xlen": xlen, "evt_keys": len(scan_keys(client, keys.event("*"))), "dbsize": int(client.dbsize()),
        "user_seq_keys": len(seqs), "user_seq_len_max": max(seq_len, default=0),
        "user_seq_len_mean": round(float(np.mean(seq_len)), 1) if seq_len else 0,
        "bought_sets": len(bought), "bought_size_max": max(bought_len, default=0),
        "stream_bytes": stream_bytes, "stream_bytes_per_entry": round(per_entry, 1),
        "user_seq_bytes_full_history": per_full_user,
        # the plateau at these caps, and at the defaults (1 M stream entries), once every user is full
        "projected_plateau_mb": round((per_entry * store.config.stream_maxlen + (per_full_user or 0) * len(seqs)) / MB, 1),
        "projected_default_caps_mb": round((per_entry * 1_000_000 + (per_full_user or 0) * len(seqs)) / MB, 1),
    }


# ---------------------------------------------------------------- impressions
def impressions_scenario(url: str, sizes: Sizes, progress: bool = True) -> dict:
    """ImpressionLog.record of `impressions` shown lists for `impression_users` users."""
    from rerank.experiments.attribution import AttributionConfig, ImpressionLog
    from rerank.eventlog.records import Impression

    client = redis.Redis.from_url(url, socket_timeout=30)
    keys = Keys()
    config = AttributionConfig(impressions_maxlen=sizes.impressions_maxlen)
    log = ImpressionLog(client, keys, config)
    rng = np.random.default_rng(1)
    flood = Flood(client, keys.impressions, sizes.impressions, "impressions", progress)
    k = sizes.impression_items
    while flood.done < sizes.impressions:
        n = min(sizes.batch, sizes.impressions - flood.done)
        users, items = rng.integers(sizes.impression_users, size=n), rng.integers(10_000, size=(n, k))
        now = time.time()
        batch = [Impression(f"req-{flood.done + j}", f"iu{users[j]}", "", "default", "1", now,
                            [(f"item-{i}", 1.0 / (p + 1), "") for p, i in enumerate(items[j])]) for j in range(n)]
        try:
            log.record(batch)
        except (redis.exceptions.OutOfMemoryError, redis.ResponseError) as err:
            flood.refused(err)
            break
        flood.add(n)
    shown, lists = scan_keys(client, keys.user_shown("*")), scan_keys(client, keys.user_impressions("*"))
    list_len, fields = lengths(client, lists, "llen"), lengths(client, shown, "hlen")
    full = [key for key, n in zip(shown, fields) if n == config.recent_per_user]
    full_lists = [key for key, n in zip(lists, list_len) if n == config.recent_per_user]
    per_user = (mean_usage(client, full) or 0) + (mean_usage(client, full_lists) or 0)  # a full user's 2 keys
    stream_bytes = int(client.memory_usage(keys.impressions, samples=0) or 0)
    out = {"impressions_maxlen": sizes.impressions_maxlen, "recent_per_user": config.recent_per_user,
           "window_s": config.window_s, "users": sizes.impression_users, "xlen": int(client.xlen(keys.impressions)),
           "stream_bytes": stream_bytes, "imp_keys": len(scan_keys(client, f"{keys.prefix}imp:*")),
           "shown_hashes": len(shown), "shown_fields_max": max(fields, default=0),
           "shown_fields_total": sum(fields), "users_full": len(full),
           "imp_hash_ttl_s": client.ttl(shown[0]) if shown else None,  # of the users' shown hashes
           "user_lists": len(lists), "user_list_len_max": max(list_len, default=0),
           "lists_match_hashes": sum(list_len) == sum(fields),
           "full_user_bytes": round(per_user, 1),
           "bytes_per_kept_impression": round(per_user / config.recent_per_user, 1),
           "dbsize": int(client.dbsize()), "memory": memory_summary(client), **flood.close()}
    # bounded by users active within window_s x recent_per_user, whatever the request rate
    out["projected_plateau_mb_per_100k_users"] = round(100_000 * per_user / MB, 1)
    curve = out["curve"]
    half = [p["used_memory"] for p in curve if p["events"] >= sizes.impressions // 2]
    out["used_memory_growth_second_half_mb"] = round((half[-1] - half[0]) / MB, 1) if half else None
    client.close()
    return out


# ---------------------------------------------------------------- running
def run(scale: float = 1.0, maxmemory: str = "512mb", anon_seconds: float = 540.0,
        only: tuple[str, ...] = SCENARIOS, progress: bool = True) -> dict:
    """Every scenario in `only`, each on a fresh EmbeddedRedis; returns the results."""
    from online_helpers import tiny_model_dir

    from rerank.infra.redis_server import EmbeddedRedis

    sizes = Sizes().scaled(scale)
    out = {"scale": scale, "maxmemory": maxmemory, "sizes": asdict(sizes), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="floods-") as tmp:
        work = Path(tmp)
        for name in only:
            with EmbeddedRedis(persist=False, maxmemory=maxmemory, data_dir=work / f"redis-{name}") as server:
                server.start()
                if name == "new_items":
                    _, model_dir = tiny_model_dir(work / "tiny")
                    out[name] = new_items_scenario(server.url, sizes, model_dir, work, progress)
                elif name == "anonymous_events":
                    out[name] = anonymous_scenario(server.url, sizes, anon_seconds, progress)
                else:
                    out[name] = impressions_scenario(server.url, sizes, progress)
    return out


def plot(results: dict, path: Path) -> None:
    """used_memory (MB) over events, one panel per scenario, maxmemory dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SCENARIOS if n in results]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        curve = results[name]["curve"]
        ax.plot([p["events"] for p in curve], [p["used_memory"] / MB for p in curve], marker="o", ms=3)
        ax.axhline(results[name]["memory"]["maxmemory"] / MB, ls="--", c="grey", label="maxmemory")
        ax.set(title=name, xlabel="events written", ylabel="Redis used_memory (MB)", ylim=(0, None))
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--maxmemory", default="512mb")
    parser.add_argument("--anon-seconds", type=float, default=540.0, help="time cap of anonymous_events")
    parser.add_argument("--only", type=scenario_list(SCENARIOS), default=",".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "floods.json")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--trainer-json", help=argparse.SUPPRESS)  # run_trainer's child process
    args = parser.parse_args()
    if args.trainer_json:
        print(json.dumps(train_on_stream(**json.loads(args.trainer_json))))
        return
    results = run(args.scale, args.maxmemory, args.anon_seconds, tuple(args.only), not args.no_progress)
    from rerank.infra.results import write_results

    write_results(args.out, results)
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""The replica's item cache (rerank.serving.item_cache) alone and in FeatureFetcher.fetch against a real Redis."""

from __future__ import annotations

import gc
import pickle
import threading
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import redis

from rerank.data.dataset import load_dataset, write_dataset
from rerank.serving.catalogue import Catalogue
from rerank.serving.item_cache import ItemCache
from rerank.serving.pipeline import FeatureFetcher
from rerank.store.events import Event
from rerank.store.feature_store import FeatureStore
from rerank.store.layout import ITEM_RECORD


class Clock:
    """A settable monotonic clock, so expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def records(idx) -> np.ndarray:
    out = np.zeros(len(idx), dtype=ITEM_RECORD)
    out["idx"] = idx
    out["views"] = np.asarray(idx) * 10
    return out


# ---- the cache alone -----------------------------------------------------------------------------


def test_a_put_record_is_served_until_ttl_then_expires():
    clock = Clock()
    cache = ItemCache(ttl_s=1.0, clock=clock)
    cache.put(["a", "b"], records([1, 2]), clock())
    got, hit = cache.lookup(["b", "x", "a", "b"])
    assert hit.tolist() == [True, False, True, True]
    assert got["idx"].tolist() == [2, 0, 1, 2] and got["views"].tolist() == [20, 0, 10, 20]
    clock.t += 0.999
    assert cache.lookup(["a"])[1].tolist() == [True]
    clock.t += 0.001  # exactly ttl_s after the read: no longer served
    assert cache.lookup(["a"])[1].tolist() == [False]
    assert cache.stats()["expired"] == 1


def test_age_counts_from_before_the_read_and_an_older_read_never_replaces_a_newer():
    clock = Clock()
    cache = ItemCache(ttl_s=1.0, clock=clock)
    cache.put(["a"], records([1]), clock.t - 2.0)  # read long ago: not even stored
    assert len(cache) == 0
    cache.put(["a"], records([5]), clock.t)
    cache.put(["a"], records([1]), clock.t - 0.5)  # a slower, older read arriving late
    assert cache.lookup(["a"])[0]["idx"].tolist() == [5]


def test_ttl_zero_caches_nothing():
    cache = ItemCache(ttl_s=0)
    cache.put(["a"], records([1]), cache.clock())
    assert len(cache) == 0 and cache.lookup(["a"])[1].tolist() == [False]


def test_entries_are_bounded_and_the_clock_keeps_what_is_hit():
    clock = Clock()
    cache = ItemCache(ttl_s=10.0, max_entries=100, clock=clock)
    hot = [f"hot{i}" for i in range(20)]
    cache.put(hot, records(range(1, 21)), clock())
    for round_ in range(30):
        assert cache.lookup(hot)[1].all()  # hit every round: their reference bits stay set
        cold = [f"cold{round_}-{i}" for i in range(40)]
        cache.put(cold, records(range(100, 140)), clock())
        assert len(cache) <= 100
    assert cache.lookup(hot)[1].all()
    assert cache.stats()["evictions"] > 0


def test_a_put_larger_than_the_cache_keeps_the_newest():
    cache = ItemCache(ttl_s=10.0, max_entries=50)
    ids = [f"i{i}" for i in range(120)]
    cache.put(ids, records(range(120)), cache.clock())
    assert len(cache) == 50
    got, hit = cache.lookup(ids)
    assert hit[-50:].all() and not hit[:70].any()
    assert got["idx"][-50:].tolist() == list(range(70, 120))


@pytest.mark.parametrize("max_bytes", [8_000, 50_000, 400_000])
def test_a_byte_bound_is_never_exceeded_by_its_count_nor_in_memory(max_bytes):
    rng = np.random.default_rng(0)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        cache = ItemCache(ttl_s=10.0, max_bytes=max_bytes)
        for round_ in range(40):
            n = int(rng.integers(1, 300))
            ids = [f"{'x' * int(rng.integers(0, 200))}-{round_}-{i}" for i in range(n)]
            cache.put(ids, records(np.arange(n)), cache.clock())
            del ids
            assert cache.nbytes <= max_bytes
            assert len(cache) <= cache.capacity
            probe = [f"{'x' * 3}-{round_}-{i}" for i in range(5)]
            got, hit = cache.lookup(probe)
            assert (got["idx"][hit] == np.flatnonzero(hit)).all()  # what is served is what was put
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(cache) > 0
    assert held <= max_bytes, f"the cache holds {held} bytes, over its bound {max_bytes}"


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="ItemCache.ttl_s"):
        ItemCache(ttl_s=-1)
    with pytest.raises(ValueError, match="ItemCache.ttl_s"):
        ItemCache(ttl_s=float("nan"))
    with pytest.raises(ValueError, match="ItemCache.max_entries"):
        ItemCache(max_entries=0)
    with pytest.raises(ValueError, match="ItemCache.max_bytes"):
        ItemCache(max_bytes=10)


def test_pickling_gives_an_empty_cache_of_the_same_settings():
    cache = ItemCache(ttl_s=0.5, max_entries=10, max_bytes=100_000)
    cache.put(["a"], records([1]), cache.clock())
    copy = pickle.loads(pickle.dumps(cache))
    assert (copy.ttl_s, copy.max_entries, copy.max_bytes, len(copy)) == (0.5, 10, 100_000, 0)


def test_concurrent_lookups_and_puts_stay_consistent():
    cache = ItemCache(ttl_s=10.0, max_entries=300)
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(200):
            idx = rng.integers(1, 1000, 50)
            ids = [f"i{i}" for i in idx]
            got, hit = cache.lookup(ids)
            if not (got["idx"][hit] == idx[hit]).all():
                errors.append("a lookup served another item's record")
            cache.put([i for i, h in zip(ids, hit) if not h], records(idx[~hit]), cache.clock())

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache) <= 300 and len(cache) == int(cache._live.sum())
    assert cache.nbytes <= cache.max_bytes


# ---- in FeatureFetcher.fetch, against Redis -------------------------------------------------------

N_ITEMS = 30


@pytest.fixture
def store(redis_url, tmp_path):
    users = pa.table({"user_idx": [1, 2, 3], "user_id": ["u1", "u2", "u3"]})
    items = pa.table({"item_idx": list(range(1, N_ITEMS + 1)), "item_id": [f"i{i}" for i in range(1, N_ITEMS + 1)],
                      "attributes": [[i % 3 + 1] for i in range(1, N_ITEMS + 1)]})
    rows = [(1, 1, "view"), (1, 2, "purchase"), (2, 3, "cart"), (2, 1, "click"), (3, 5, "view")]
    events = pa.table({"user_idx": [r[0] for r in rows], "item_idx": [r[1] for r in rows],
                       "event_type": [r[2] for r in rows], "ts": [float(k) for k in range(len(rows))]})
    dataset = load_dataset(write_dataset(tmp_path / "ds", users, items, events, "tiny", "test", True))
    store = FeatureStore(redis_url)
    store.bulk_load(dataset, progress=False)
    yield store
    store.close()


def fetcher(store: FeatureStore, cache: ItemCache | None) -> FeatureFetcher:
    catalogue = SimpleNamespace(current=Catalogue(*store.catalogue()))  # what RefreshingCatalogue offers
    return FeatureFetcher(store, catalogue, history_len=50, item_cache=cache)


REQUESTS = [("u1", ["i1", "i2", "i3", "new1", "i1"]), ("u2", ["i3", "i4", "i30"]), ("u3", None),
            ("nobody", ["i2", "new1"]), ("u1", [])]


def assert_same(got, want) -> None:
    assert [f.candidate_ids for f in got.items] == [f.candidate_ids for f in want.items]
    for a, b in zip(got.items, want.items):
        fa, fb = a.features, b.features
        assert a.degraded == b.degraded and fa.user_id == fb.user_id
        for name in ("history", "history_types", "history_ts", "purchased", "candidates", "candidate_stats"):
            x, y = getattr(fa, name), getattr(fb, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert x.dtype == y.dtype and x.tolist() == y.tolist(), name
        assert fa.last_event_ts == fb.last_event_ts


def redis_calls(url: str, command: str) -> int:
    return redis.Redis.from_url(url).info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_ttl_zero_reads_every_candidate_as_without_a_cache(store):
    plain = fetcher(store, None)
    off = fetcher(store, ItemCache(ttl_s=0))
    assert off.item_cache is None
    assert_same(off.fetch(REQUESTS), plain.fetch(REQUESTS))
    before = redis_calls(store.url, "hmget")
    off.fetch(REQUESTS)
    assert redis_calls(store.url, "hmget") == before + 1


def test_a_warm_cache_gives_the_same_features_without_asking_redis_for_items(store):
    plain = fetcher(store, None)
    cached = fetcher(store, ItemCache(ttl_s=60.0))
    assert_same(cached.fetch(REQUESTS), plain.fetch(REQUESTS))  # cold: fills the cache
    before = redis_calls(store.url, "hmget"), redis_calls(store.url, "lrange")
    warm = cached.fetch(REQUESTS)
    assert (redis_calls(store.url, "hmget"), redis_calls(store.url, "lrange")) == (before[0], before[1] + 5)
    assert_same(warm, plain.fetch(REQUESTS))
    assert cached.item_cache.stats()["hits"] == 10  # every candidate of the warm batch
    # a batch with some new candidates asks only for those
    more = [("u2", ["i1", "i7", "i8"])]
    misses = cached.item_cache.stats()["misses"]
    assert_same(cached.fetch(more), plain.fetch(more))
    assert cached.item_cache.stats()["hits"] == 11 and cached.item_cache.stats()["misses"] == misses + 2


def test_counter_changes_show_after_ttl_and_histories_at_once(store):
    clock = Clock()
    cached = fetcher(store, ItemCache(ttl_s=1.0, clock=clock))
    plain = fetcher(store, None)
    request = [("u3", ["i5", "i6"])]
    (first,) = cached.fetch(request).items
    assert first.features.candidate_stats[:, 0].tolist() == [1, 0]
    store.write_events([Event("u3", "i6", "view", ts=50.0), Event("u3", "i6", "click", ts=51.0)])
    clock.t += 0.9
    (stale,) = cached.fetch(request).items
    assert stale.features.history.tolist() == [5, 6, 6]  # histories are never cached
    assert stale.features.candidate_stats.tolist() == first.features.candidate_stats.tolist()  # within ttl_s
    clock.t += 0.1
    fresh, want = cached.fetch(request), plain.fetch(request)
    assert fresh.items[0].features.candidate_stats[1].tolist() == [1, 1, 0, 0]
    assert_same(fresh, want)


def test_a_new_item_is_cached_as_unknown_for_at_most_ttl(store):
    clock = Clock()
    cached = fetcher(store, ItemCache(ttl_s=1.0, clock=clock))
    request = [("u1", ["new1", "i1"])]
    assert cached.fetch(request).items[0].features.candidates.tolist() == [0, 1]
    store.write_events([Event("u2", "new1", "view")])  # registers it: idx N_ITEMS + 1
    clock.t += 0.5
    assert cached.fetch(request).items[0].features.candidates.tolist() == [0, 1]
    clock.t += 0.5
    got = cached.fetch(request).items[0].features
    assert got.candidates.tolist() == [N_ITEMS + 1, 1] and got.candidate_stats[0].tolist() == [1, 0, 0, 0]


def test_redis_down_degrades_as_without_a_cache(redis_server, store):
    cached = fetcher(store, ItemCache(ttl_s=60.0))
    cached.fetch(REQUESTS)
    redis_server.stop()
    try:
        down = cached.fetch(REQUESTS[:2])
    finally:
        redis_server.start()
    assert all(f.degraded for f in down.items)
    assert down.items[0].features.candidates.tolist() == [1, 2, 3, 0, 1]
    assert down.items[0].features.candidate_stats is None

"""Every stored answer, stream entry and per-user state bounded in bytes, attribution cost bounded,
event ts bounded: one test per finding of the security review, on a real Redis.

The findings (measured on the code before): a rank-only key could fill Redis through the impressions
stream (capped by entries, ~280 KB each at k = 1000 of 251-character ids); attributing 1,000 clicks
decoded every stored answer of the user for every event; idempotency markers outgrew the embedded
Redis; an event's ts had no upper bound; the bought set had no cap.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from pydantic import ValidationError

from rerank.eventlog.records import Impression, impression_row
from rerank.experiments.attribution import AttributionConfig, ImpressionLog, read_shown
from rerank.store.events import Event
from rerank.store.feature_store import FeatureStore
from rerank.store.keys import Keys

LONG = 251  # the review's item ids


def _long_id(n: int, tag: str = "") -> str:
    return f"{tag}{n:06d}-".ljust(LONG, "x")


def _big_answer(request_id: str, user: str, tag: str, k: int = 1000, ts: float | None = None) -> Impression:
    """A k = 1000 answer of 251-character ids: the largest /rank answer the API allows."""
    return Impression(request_id, user, "exp", "treat", "v1", time.time() if ts is None else ts,
                      [(_long_id(j, tag), 1.0 - j / k, "") for j in range(k)])


def _log(redis_url: str, **config) -> tuple[redis.Redis, Keys, ImpressionLog]:
    keys = Keys(f"t{uuid.uuid4().hex[:8]}:")
    client = redis.Redis.from_url(redis_url, socket_timeout=5)  # the old attribution script ran for minutes
    return client, keys, ImpressionLog(client, keys, AttributionConfig(**config))


def _used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _memory(client: redis.Redis, *keys: str) -> int:
    return sum(int(client.memory_usage(k, samples=0) or 0) for k in keys)


# --------------------------------------------------------------- ids: one bound, API and store
def test_ids_are_bounded_by_one_constant_in_the_api_and_the_store(redis_url):
    from rerank.serving import api
    from rerank.store import events
    from rerank.store.errors import EventValidationError

    assert api.MAX_ID_LENGTH is events.MAX_ID_LENGTH == 256
    store = FeatureStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    longest = "i" * events.MAX_ID_LENGTH
    assert store.write_events([Event("u", longest, "view")]) == [True]
    api.EventIn.model_validate({"user_id": "u", "item_id": longest, "type": "view"})
    for where in ("user_id", "item_id", "event_id"):
        fields = {"user_id": "u", "item_id": "i", "event_id": "e", where: longest + "x"}
        with pytest.raises(EventValidationError, match=f"{where}: longer than {events.MAX_ID_LENGTH}"):
            store.write_events([Event(fields["user_id"], fields["item_id"], "view", event_id=fields["event_id"])])
    with pytest.raises(ValidationError, match="item_id"):
        api.EventIn.model_validate({"user_id": "u", "item_id": longest + "x", "type": "view"})
    with pytest.raises(ValidationError, match="candidates"):
        api.RankRequest.model_validate({"user_id": "u", "candidates": [longest + "x"]})


# --------------------------------------------------------------- stored answers: bounded, marked
def test_a_stored_answer_keeps_its_first_items_within_the_bounds_and_says_it_was_cut(redis_url):
    client, keys, log = _log(redis_url)
    cfg = log.config
    short = Impression("r-short", "u1", "exp", "treat", "v1", time.time(), [(f"i{j}", 1.0, "") for j in range(1000)])
    log.record([_big_answer("r-long", "u1", "a"), short,
                Impression("r-small", "u2", "", "default", "v1", time.time(), [("x", 1.0, ""), ("y", 0.5, "")])])
    rows = {f["request_id"]: impression_row(i, f) for i, f in
            redis.Redis.from_url(redis_url, decode_responses=True).xrange(keys.impressions)}
    long_row, short_row, small = rows["r-long"], rows["r-short"], rows["r-small"]
    assert short_row["n_items"] == long_row["n_items"] == 1000
    assert [x["item_id"] for x in short_row["items"]] == [f"i{j}" for j in range(cfg.max_impression_items)]
    assert 0 < len(long_row["items"]) < cfg.max_impression_items  # the byte bound cut it first
    assert [x["item_id"] for x in long_row["items"]] == [_long_id(j, "a") for j in range(len(long_row["items"]))]
    assert small["n_items"] == len(small["items"]) == 2  # nothing cut
    for fields in redis.Redis.from_url(redis_url, decode_responses=True).xrange(keys.impressions):
        assert len(fields[1]["items"].encode()) <= cfg.max_impression_bytes
    # attribution stores the same items: the first positions attribute, the cut ones do not
    assert list(read_shown(client, keys, "u1", "r-long")) == [x["item_id"] for x in long_row["items"]]
    got = log.attribute([("u1", "i5", "r-short"), ("u1", f"i{cfg.max_impression_items}", "r-short"),
                         ("u1", _long_id(0, "a"), "r-long")])
    assert [(a.request_id, a.position, a.how) for a in got] == [("r-short", 6, "request_id"), ("", None, ""),
                                                               ("r-long", 1, "request_id")]
    assert Impression("r", "u", "", "", "", 0.0, [("a", 1.0, "")]).stored(1, 1024).n_items is None
    with pytest.raises(ValueError, match="max_impression_bytes"):
        AttributionConfig(max_impression_bytes=100)


# --------------------------------------------------------------- the impressions stream: a byte budget
def test_two_hundred_largest_answers_grow_redis_by_at_most_20_mb(redis_url):
    client, keys, log = _log(redis_url)
    before = _used(client)
    for batch in range(10):  # 200 /rank answers of k = 1000, 251-character ids, to 200 users (the review's)
        log.record([_big_answer(uuid.uuid4().hex, f"u{batch}-{i}", f"{batch}-{i}-") for i in range(20)])
    assert client.xlen(keys.impressions) == 200
    assert _used(client) - before <= 20 * 2**20  # it was 59-100 MB


def test_the_impressions_stream_is_held_to_its_byte_budget_and_entry_cap(redis_url):
    from rerank.experiments.attribution import entry_bytes

    budget = 2**20
    client, keys, log = _log(redis_url, impressions_max_bytes=budget)
    for batch in range(15):  # 300 largest stored answers (~8 KB each): ~2.5 budgets
        log.record([_big_answer(uuid.uuid4().hex, f"u{i}", f"{batch}-{i}-") for i in range(20)])
    entries = client.xrange(keys.impressions)
    counted = sum(entry_bytes({k.decode(): v.decode() for k, v in fields.items()}) for _, fields in entries)
    assert int(client.get(keys.impressions_bytes)) == counted <= budget
    assert counted > budget - 20_000  # it trims the oldest only as far as needed
    assert _memory(client, keys.impressions) <= 1.3 * budget  # capacity.STREAM_MEMORY_FACTOR
    newest = [json.loads(f[b"items"])[0][0] for _, f in entries[-20:]]
    assert newest == [_long_id(0, f"14-{i}-") for i in range(20)]  # the oldest went, the newest stayed
    # the entry cap still holds, exactly
    client2, keys2, capped = _log(redis_url, impressions_maxlen=30)
    for batch in range(4):
        capped.record([Impression(uuid.uuid4().hex, "u", "", "default", "v", time.time(), [("a", 1.0, "")])] * 10)
    assert client2.xlen(keys2.impressions) == 30


def test_per_user_attribution_state_is_bounded_in_count_and_bytes(redis_url):
    client, keys, log = _log(redis_url)
    cfg = log.config
    for batch in range(3):  # 60 of the largest answers to one user: 3 x recent_per_user
        log.record([_big_answer(uuid.uuid4().hex, "u1", f"{batch}-{i}-") for i in range(20)])
    state = _memory(client, *client.keys(keys.user_seq("u1").replace(":seq", ":*")))  # every key of the user's
    assert state <= 2 * 2**20  # it was ~6 MB (20 answers of ~280 KB)
    user_keys = (keys.user_impressions("u1"), keys.user_shown("u1"), keys.user_seen("u1"))
    assert state == _memory(client, *user_keys) <= cfg.user_state_bytes()
    assert client.llen(user_keys[0]) == client.hlen(user_keys[1]) == cfg.recent_per_user
    assert client.hlen(user_keys[2]) <= cfg.recent_per_user * cfg.max_impression_items
    assert all(0 < client.ttl(k) <= cfg.window_s for k in user_keys)


# --------------------------------------------------------------- attribution: O(1) an event
def test_attributing_an_event_costs_the_same_whatever_the_user_was_shown(redis_url):
    client, keys, log = _log(redis_url)
    now = time.time()
    rids = [f"{i:032x}" for i in range(200)]
    for start in range(0, 200, 20):  # the review's 200 largest answers to one user, each item shown twice
        log.record([_big_answer(rids[i], "u1", f"{i // 2}-", ts=now - 200 + i) for i in range(start, start + 20)])
    older, newest = rids[-2], rids[-1]  # both showed the items tagged "99-"
    calls = {
        "never shown": [("u1", f"never-{j}", None) for j in range(1000)],
        "never shown, with a request_id": [("u1", f"never-{j}", newest) for j in range(1000)],
        "shown again since (reads that one answer)": [("u1", _long_id(j % 20, "99-"), older) for j in range(1000)],
        "by window": [("u1", _long_id(j % 20, "99-"), None) for j in range(1000)],
    }
    def lookups() -> int:  # key lookups Redis made (inside scripts too): the work, not the clock
        stats = client.info("stats")
        return int(stats["keyspace_hits"]) + int(stats["keyspace_misses"])

    per_event = {}
    for name, events in calls.items():
        before = lookups()
        got = log.attribute(events, now=now)
        per_event[name] = (lookups() - before) / len(events)
        hits = {(a.request_id, a.how) for a in got}
        assert hits == {"never shown": {("", "")}, "never shown, with a request_id": {("", "")},
                        "shown again since (reads that one answer)": {(older, "request_id")},
                        "by window": {(newest, "window")}}[name], name
    # the index: a couple of lookups per event whatever the user was shown (the script used to read and
    # decode every stored answer of the user for each event: 200 here); ~0.02-0.09 s per 1,000 events
    assert max(per_event.values()) <= 4, per_event


# --------------------------------------------------------------- the bought set: the most recent N
def test_the_bought_set_keeps_the_most_recent_purchases(redis_url, make_dataset):
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = FeatureStore(redis_url, prefix=prefix)
    cap = 500  # FeatureStoreConfig.max_bought's default
    n = cap + 100
    for start in range(0, n, 200):
        store.write_events([Event("u1", f"i{j}", "purchase", ts=1000.0 + j) for j in range(start, min(n, start + 200))])
    (features,) = store.fetch([("u1", None)])
    kept = set(store.item_index([f"i{j}" for j in range(n - cap, n)]).tolist())
    assert set(features.purchased.tolist()) == kept  # the oldest 100 left
    assert store.config.max_bought == cap
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(store.keys.user_bought("u1")) == cap
    # a re-purchase of an old item makes it recent again; a late event with an older ts does not demote it
    store.write_events([Event("u1", "i0", "purchase", ts=5000.0), Event("u1", "i0", "purchase", ts=1.0)])
    assert client.zscore(store.keys.user_bought("u1"), int(store.item_index(["i0"])[0])) == 5000.0
    assert client.zcard(store.keys.user_bought("u1")) == cap
    # a bought set written before the cap (a plain set) is read as it is, and converted by the next purchase
    legacy_idx = store.item_index(["i1", "i2"]).tolist()
    client.sadd(store.keys.user_bought("old"), *legacy_idx)
    got = store.fetch([("u1", None), ("old", None), ("nobody", None)])
    assert got[1].purchased.tolist() == sorted(legacy_idx) and len(got[0].purchased) == cap and not len(got[2].purchased)
    store.write_events([Event("old", "i3", "purchase", ts=2000.0)])
    assert client.type(store.keys.user_bought("old")) == b"zset"
    assert sorted(store.fetch([("old", None)])[0].purchased.tolist()) == sorted(legacy_idx + store.item_index(["i3"]).tolist())
    # bulk_load keeps the most recent max_bought too
    data = make_dataset([[1, 2, 3, 4, 5, 6]], timestamps=[[10, 20, 30, 40, 50, 60]])
    small = FeatureStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:", max_bought=3)
    small.bulk_load(data, progress=False)
    assert sorted(small.fetch([("u1", None)])[0].purchased.tolist()) == [4, 5, 6]


# --------------------------------------------------------------- idempotency markers: a memory plan
def test_idempotency_markers_are_projected_against_maxmemory(redis_url, redis_server):
    from rerank.store import capacity
    from rerank.store.config import FeatureStoreConfig

    week = 7 * 24 * 3600
    assert capacity.project_marker_bytes(200, week, 100) == 200 * week * 100  # the review's ~12 GB
    day_of_2gb = 2 * 2**30 / (200 * capacity.MARKER_BYTES) / 3600
    assert 20 < day_of_2gb < 26  # the embedded 2 GB fills with markers alone in about a day
    with pytest.raises(ValueError, match="events_per_s"):
        capacity.project_marker_bytes(-1, 10)

    weekly = FeatureStore(redis_url, event_ttl_s=week)
    plan = weekly.memory_projection(expected_events_per_s=200, impressions_max_bytes=AttributionConfig().impressions_max_bytes)
    assert plan.parts["idempotency markers"] == capacity.project_marker_bytes(200, week)
    (problem,) = weekly.check_server(projection=plan)  # the session's server: maxmemory 2gb, noeviction
    assert "idempotency markers" in problem and "event_ttl_s" in problem and "maxmemory is 2048 MiB" in problem
    with pytest.raises(capacity.MemoryPlanError, match="idempotency markers"):
        weekly.check_server(projection=plan, refuse=True)
    # the defaults fit the embedded server's default maxmemory, with the impressions budget
    default = FeatureStore(redis_url)
    fits = default.memory_projection(impressions_max_bytes=AttributionConfig().impressions_max_bytes)
    assert default.check_server(projection=fits) == []
    assert fits.total <= 0.9 * 2 * 2**30
    # the maxmemory an embedded server needs for its bounds
    size = capacity.embedded_maxmemory(plan)
    assert size % 2**20 == 0 and size >= 1.25 * plan.total
    assert capacity.embedded_maxmemory(capacity.project_memory(FeatureStoreConfig(stream_maxlen=10),
                                                               expected_events_per_s=0)) == 256 * 2**20
    with pytest.raises(capacity.MemoryPlanError, match="event_ttl_s"):
        capacity.embedded_maxmemory(plan, maximum=2 * 2**30)


# --------------------------------------------------------------- event ts: not from the far future
def test_event_ts_is_bounded_ahead_of_the_server_clock():
    from rerank.serving.api import EventsRequest

    def validate(ts, **kw):
        return EventsRequest.model_validate({"events": [{"user_id": "u", "item_id": "i", "type": "click", "ts": ts}]},
                                            **kw)

    for ts, needle in ((2e9, "ahead of the server clock; at most 300 s ahead"), (1e12, "milliseconds")):
        with pytest.raises(ValidationError, match=needle) as info:
            validate(ts)
        assert info.value.errors()[0]["loc"] == ("events", 0, "ts")
    now = time.time()
    for ok in (now, now - 10, now + 10, now + 250, 10.0):  # historic replays send old timestamps
        assert validate(ok).events[0].ts == ok
    with pytest.raises(ValidationError, match="ahead"):
        validate(time.time() + 301)
    from rerank.serving.api import EventTsBounds, configure_event_ts, event_ts_bounds

    strict = EventTsBounds(max_future_skew_s=5, min_ts=946_684_800)  # 2000-01-01
    with pytest.raises(ValidationError, match="before the earliest accepted ts"):
        validate(10.0, context={"event_ts_bounds": strict})
    with pytest.raises(ValidationError, match="at most 5 s ahead"):
        validate(time.time() + 60, context={"event_ts_bounds": strict})
    previous = configure_event_ts(strict)
    try:
        assert event_ts_bounds() is strict
        with pytest.raises(ValidationError, match="before"):
            validate(10.0)
    finally:
        configure_event_ts(previous)
    assert validate(10.0).events[0].ts == 10.0
    with pytest.raises(ValueError, match="max_future_skew_s"):
        EventTsBounds(max_future_skew_s=float("inf"))

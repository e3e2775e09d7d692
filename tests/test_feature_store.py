"""The Redis feature store against a real redis-server (the `redis_url` fixture)."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pyarrow as pa
import pytest
import redis

from rerank.dataset import load_dataset, write_dataset
from rerank.feature_store import (
    Event,
    EventValidationError,
    FeatureStore,
    FeatureStoreError,
    FeatureStoreUnavailable,
    parse_stream_seq,
)

# user -> [(item_id, type, ts)] in time order
HISTORIES = {
    "alice": [("i1", "view", 100), ("i2", "click", 110), ("i3", "purchase", 120)],
    "bob": [("i2", "view", 50), ("i4", "cart", 60), ("i4", "purchase", 70), ("i1", "view", 80)],
    "carol": [("i5", "view", 10)],
}
ITEMS = {"i1": [1, 3], "i2": [1], "i3": [2, 3], "i4": [2], "i5": []}


@pytest.fixture
def dataset(tmp_path):
    item_ids = list(ITEMS)
    user_ids = list(HISTORIES)
    events = [
        (user_ids.index(u) + 1, item_ids.index(i) + 1, t, ts) for u, hist in HISTORIES.items() for i, t, ts in hist
    ]
    users = pa.table({"user_idx": range(1, len(user_ids) + 1), "user_id": user_ids})
    items = pa.table(
        {"item_idx": range(1, len(item_ids) + 1), "item_id": item_ids, "attributes": [ITEMS[i] for i in item_ids]}
    )
    ev = pa.table(dict(zip(("user_idx", "item_idx", "event_type", "ts"), map(list, zip(*events)))))
    return load_dataset(write_dataset(tmp_path / "ds", users, items, ev, "tiny", "test", True))


@pytest.fixture
def store(redis_url):
    store = FeatureStore(redis_url, socket_timeout_s=0.2)
    yield store
    store.close()


@pytest.fixture
def loaded(store, dataset):
    store.bulk_load(dataset, progress=False)
    return store


def test_bulk_load_then_fetch_returns_histories_and_candidates(loaded):
    alice, bob, nobody = loaded.fetch([("alice", ["i3", "i1", "zzz"]), ("bob", None), ("nobody", ["i5"])])
    assert alice.history.tolist() == [1, 2, 3]  # oldest -> newest
    assert alice.history_types.tolist() == [1, 2, 4]
    assert alice.history_ts.tolist() == [100.0, 110.0, 120.0]
    assert alice.purchased.tolist() == [3]
    assert alice.last_event_ts == 120.0 and 0 < alice.feature_age_ms
    assert alice.candidates.tolist() == [3, 1, 0]  # 0 = unknown item
    # i3: one purchase (alice); i1: views by alice and bob; unknown: zeros
    assert alice.candidate_stats.tolist() == [[0, 0, 0, 1], [2, 0, 0, 0], [0, 0, 0, 0]]
    assert bob.history.tolist() == [2, 4, 4, 1] and bob.purchased.tolist() == [4]
    assert bob.candidates is None and bob.candidate_stats is None
    assert nobody.history.size == 0 and nobody.last_event_ts is None and nobody.feature_age_ms is None
    assert nobody.candidates.tolist() == [5]


def test_history_len_keeps_the_newest(loaded):
    (bob,) = loaded.fetch([("bob", [])], history_len=2)
    assert bob.history.tolist() == [4, 1]
    assert bob.candidates.tolist() == [] and bob.candidate_stats.shape == (0, 4)


def test_bulk_load_is_idempotent_and_caps_history(redis_url, dataset):
    store = FeatureStore(redis_url, max_history=2)
    first = store.bulk_load(dataset, progress=False)
    client = redis.Redis.from_url(redis_url)
    snapshot = {k: client.dump(k) for k in client.keys("*")}
    store.bulk_load(dataset, progress=False)
    assert {k: client.dump(k) for k in client.keys("*")} == snapshot
    assert first["users"] == 3 and first["items"] == 5 and first["events"] == 8
    (bob,) = store.fetch([("bob", None)])
    assert bob.history.tolist() == [4, 1]
    assert client.ttl(store.keys.user_seq("bob")) > 0
    assert client.xlen(store.keys.events) == 0  # history does not go to the stream


def test_bulk_load_drop_last_leaves_the_last_events_out(store, dataset):
    stats = store.bulk_load(dataset, progress=False, drop_last=1)
    alice, carol = store.fetch([("alice", ["i3"]), ("carol", None)])
    assert stats["events"] == 5
    assert alice.history.tolist() == [1, 2] and alice.purchased.size == 0
    assert alice.candidate_stats.tolist() == [[0, 0, 0, 0]]
    assert carol.history.size == 0


def test_catalogue_and_item_index(loaded):
    item_ids, attributes = loaded.catalogue()
    assert item_ids.tolist() == ["", "i1", "i2", "i3", "i4", "i5"]
    assert attributes.shape == (6, 2)
    assert attributes[1].tolist() == [1, 3] and attributes[5].tolist() == [0, 0]
    assert loaded.item_index(["i4", "nope", "i1"]).tolist() == [4, 0, 1]
    assert loaded.item_stats()[4].tolist() == [0, 0, 1, 1]


def test_event_is_visible_to_the_next_fetch(loaded):
    assert loaded.write_events([Event("alice", "i4", "cart", ts=130.0, event_id="e1")]) == [True]
    (alice,) = loaded.fetch([("alice", ["i4"])])
    assert alice.history.tolist() == [1, 2, 3, 4]
    assert alice.history_types[-1] == 3 and alice.last_event_ts == 130.0
    assert alice.candidate_stats.tolist() == [[0, 0, 2, 1]]


def test_duplicate_event_id_is_applied_once(loaded):
    event = Event("carol", "i1", "click", ts=20.0, event_id="dup")
    assert loaded.write_events([event, event]) == [True, False]
    assert loaded.write_events([event]) == [False]
    (carol,) = loaded.fetch([("carol", ["i1"])])
    assert carol.history.tolist() == [5, 1]
    assert carol.candidate_stats[0, 1] == 1
    assert redis.Redis.from_url(loaded.url).xlen(loaded.keys.events) == 1


def test_purchase_goes_to_bought_set(loaded):
    loaded.write_events([Event("carol", "i2", "purchase", event_id="p1"), Event("carol", "i2", "view")])
    (carol,) = loaded.fetch([("carol", None)])
    assert carol.purchased.tolist() == [2]
    assert carol.history.tolist() == [5, 2, 2]


def test_new_item_gets_a_new_idx(loaded):
    assert loaded.write_events([Event("dave", "brand-new", "view"), Event("erin", "brand-new", "click")]) == [True] * 2
    assert loaded.item_index(["brand-new"]).tolist() == [6]
    (dave,) = loaded.fetch([("dave", ["brand-new"])])
    assert dave.history.tolist() == [6] and dave.candidates.tolist() == [6]
    assert dave.candidate_stats.tolist() == [[1, 1, 0, 0]]
    item_ids, attributes = loaded.catalogue()
    assert item_ids[6] == "brand-new" and attributes[6].tolist() == [0, 0]


def test_item_capacity_stops_assigning(redis_url, dataset):
    store = FeatureStore(redis_url, item_capacity=6)
    store.bulk_load(dataset, progress=False)
    store.write_events([Event("u", "new-a", "view"), Event("u", "new-b", "view", event_id="b")])
    assert store.item_index(["new-a", "new-b"]).tolist() == [6, 0]
    (u,) = store.fetch([("u", None)])
    assert u.history.tolist() == [6]  # an item without idx cannot enter the sequence
    entries = redis.Redis.from_url(redis_url, decode_responses=True).xrange(store.keys.events)
    assert entries[-1][1]["event_id"] == "b" and entries[-1][1]["item_idx"] == "0"


def test_stream_entry_carries_the_pre_event_sequence(loaded):
    loaded.write_events([Event("bob", "i5", "click", ts=90.5, event_id="s1")])
    entries = redis.Redis.from_url(loaded.url, decode_responses=True).xrange(loaded.keys.events)
    (_, fields), = entries
    assert fields["event_id"] == "s1" and fields["user_id"] == "bob" and fields["item_id"] == "i5"
    assert fields["item_idx"] == "5" and fields["type"] == "click" and float(fields["ts"]) == 90.5
    assert fields["seq"] == "2:1 4:3 4:4 1:1"
    idx, types = parse_stream_seq(fields["seq"])
    assert idx.tolist() == [2, 4, 4, 1] and types.tolist() == [1, 3, 4, 1]
    assert parse_stream_seq("")[0].size == 0


def test_stream_seq_is_capped(redis_url):
    store = FeatureStore(redis_url, stream_seq_len=2)
    store.write_events([Event("u", f"x{i}", "view", ts=float(i)) for i in range(4)])
    last = redis.Redis.from_url(redis_url, decode_responses=True).xrevrange(store.keys.events, count=1)[0][1]
    assert last["seq"] == "2:1 3:1"  # x1, x2 got idx 2, 3 (x0 got 1)


@pytest.mark.parametrize(
    "event, field",
    [
        (Event("u", "i1", "like"), "type"),
        (Event("", "i1", "view"), "user_id"),
        (Event("u", None, "view"), "item_id"),
        (Event("u", "i1", "view", ts=float("nan")), "ts"),
        (Event("u", "i1", "view", ts="yesterday"), "ts"),
        (Event("u", "i1", "view", event_id=""), "event_id"),
    ],
)
def test_invalid_events_are_refused_before_writing(store, event, field):
    with pytest.raises(EventValidationError, match=rf"events\[1\]\.{field}"):
        store.write_events([Event("u", "i1", "view", event_id="ok"), event])
    assert redis.Redis.from_url(store.url).dbsize() == 0  # nothing written, not even the valid one


def test_unknown_type_message_names_the_type(store):
    with pytest.raises(ValueError, match="'like' is not one of view\\|click\\|cart\\|purchase"):
        store.write_events([Event("u", "i1", "like")])


def test_bulk_load_refuses_a_conflicting_mapping(store, dataset):
    store.write_events([Event("u", "other", "view")])  # takes idx 1, which the dataset gives to i1
    with pytest.raises(FeatureStoreError, match="'other' has idx 1"):
        store.bulk_load(dataset, progress=False)


def test_outage_raises_unavailable_quickly_and_recovers(redis_server, redis_url, dataset):
    store = FeatureStore(redis_url, socket_timeout_s=0.2, connect_timeout_s=0.2)
    store.bulk_load(dataset, progress=False)
    redis_server.stop()
    try:
        assert store.ping() is False
        with pytest.raises(FeatureStoreUnavailable, match="unavailable during fetch"):
            store.fetch([("alice", ["i1"])])
        with pytest.raises(FeatureStoreUnavailable, match="unavailable during write_events"):
            store.write_events([Event("alice", "i1", "view", event_id="during-outage")])
        with pytest.raises(FeatureStoreUnavailable):
            store.catalogue()
    finally:
        redis_server.start()
    assert store.ping() is True
    assert store.write_events([Event("alice", "i4", "view", event_id="after")]) == [True]
    (alice,) = store.fetch([("alice", None)])
    assert alice.history.tolist() == [1, 2, 3, 4]  # loaded data survived the restart (append-only file)


def test_script_cache_lost_on_restart_is_reloaded(redis_server, redis_url):
    store = FeatureStore(redis_url)
    assert store.write_events([Event("u", "a", "view")]) == [True]
    redis.Redis.from_url(redis_url).script_flush()
    assert store.write_events([Event("u", "b", "view")]) == [True]
    assert store.fetch([("u", None)])[0].history.tolist() == [1, 2]


def test_store_survives_pickling(loaded):
    copy = pickle.loads(pickle.dumps(loaded))
    assert copy.config == loaded.config
    assert copy.fetch([("alice", None)])[0].history.tolist() == [1, 2, 3]


def test_default_timestamp_is_now(store):
    before = time.time()
    store.write_events([Event("u", "a", "view")])
    (u,) = store.fetch([("u", None)])
    assert before <= u.last_event_ts <= time.time()
    assert not np.isnan(u.feature_age_ms)


def test_hung_server_times_out_as_unavailable(redis_server, redis_url):
    """A server that accepts nothing (SIGSTOP) is reported by the socket timeout, not waited on."""
    import os
    import signal

    store = FeatureStore(redis_url, socket_timeout_s=0.1, connect_timeout_s=0.1)
    assert store.ping()
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(FeatureStoreUnavailable):
            store.fetch([("alice", ["i1"])])
        with pytest.raises(FeatureStoreUnavailable):
            store.write_events([Event("alice", "i1", "view")])
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    assert store.write_events([Event("alice", "i1", "view", event_id="x")]) == [True]


def test_server_out_of_memory_is_reported_as_unavailable(redis_url):
    """OOM (and READONLY, LOADING...) replies are retryable: the event was not stored."""
    store = FeatureStore(redis_url)
    client = redis.Redis.from_url(redis_url)
    old = client.config_get("maxmemory")["maxmemory"]
    client.config_set("maxmemory", 1)  # below what is used: every write is refused
    try:
        with pytest.raises(FeatureStoreUnavailable, match="OOM"):
            store.write_events([Event("u", "a", "view", event_id="oom")])
        assert store.fetch([("u", None)])[0].history.size == 0  # reads still work
    finally:
        client.config_set("maxmemory", old)
    assert store.write_events([Event("u", "a", "view", event_id="oom")]) == [True]


def test_real_beauty_slice_round_trips_through_the_store(shared_data, tmp_path, redis_url):
    """Real Amazon Beauty sequences (first 300 users): the store returns each user's newest events."""
    from rerank.importers import import_sasrec

    beauty = shared_data / "amazon-beauty"
    lines = (beauty / "Beauty.txt").read_text().splitlines()[:300]
    (tmp_path / "Beauty.txt").write_text("\n".join(lines) + "\n")
    import_sasrec(tmp_path / "Beauty.txt", tmp_path / "beauty", beauty / "Beauty_item2attributes.json")
    dataset = load_dataset(tmp_path / "beauty")
    store = FeatureStore(redis_url, max_history=20)
    stats = store.bulk_load(dataset, progress=False)
    assert stats["users"] == 300 and stats["events"] == sum(len(line.split()) - 1 for line in lines)

    users = [1, 2, 150, 300]
    requests = [(dataset.user_ids[u], dataset.item_ids[dataset.sequences[u]].tolist()) for u in users]
    for u, got in zip(users, store.fetch(requests, history_len=20)):
        seq = dataset.sequences[u]
        assert got.history.tolist() == seq[-20:].tolist()
        assert got.candidates.tolist() == seq.tolist()  # the user's own items, in request order
        assert got.purchased.tolist() == sorted(set(seq.tolist()))  # Beauty reviews import as purchases
        assert (got.candidate_stats[:, 3] >= 1).all()
    item_ids, attributes = store.catalogue()
    assert item_ids.tolist() == dataset.item_ids.tolist()
    np.testing.assert_array_equal(attributes[:, : dataset.item_attributes.shape[1]], dataset.item_attributes)
    np.testing.assert_array_equal(store.item_stats()[:, 3], dataset.item_popularity())


def test_real_movielens_events_replayed_online_match_the_history(shared_data, tmp_path, redis_url):
    """MovieLens 100k with real timestamps: load all but each user's last 5 ratings, replay those
    as events, and the store ends up with the full time-ordered history."""
    from rerank.importers import import_recbole

    ml = shared_data / "ml-100k"
    import_recbole(ml / "ml-100k.inter", tmp_path / "ml", ml / "ml-100k.item")
    dataset = load_dataset(tmp_path / "ml")
    store = FeatureStore(redis_url, max_history=50)
    store.bulk_load(dataset, progress=False, drop_last=5)
    users = range(1, 41)
    events = [
        Event(dataset.user_ids[u], dataset.item_ids[i], "purchase", ts=float(t), event_id=f"ml-{u}-{k}")
        for u in users
        for k, (i, t) in enumerate(zip(dataset.sequences[u][-5:], dataset.timestamp_sequences[u][-5:]))
    ]
    assert all(store.write_events(events))
    assert not any(store.write_events(events[:7]))  # a replayed batch changes nothing
    for u, got in zip(users, store.fetch([(dataset.user_ids[u], None) for u in users], history_len=50)):
        assert got.history.tolist() == dataset.sequences[u][-50:].tolist()
        assert got.history_ts.tolist() == dataset.timestamp_sequences[u][-50:].astype(float).tolist()
    assert redis.Redis.from_url(redis_url).xlen(store.keys.events) == len(events)


def test_fetch_with_shared_candidates_maps_each_request(loaded):
    shared = ["i1", "i2", "i3", "i4", "i5"]
    features = loaded.fetch([("alice", shared), ("bob", shared[::-1]), ("carol", ["i5", "x", "i5"])])
    assert features[0].candidates.tolist() == [1, 2, 3, 4, 5]
    assert features[1].candidates.tolist() == [5, 4, 3, 2, 1]
    assert features[1].candidate_stats[1].tolist() == [0, 0, 1, 1]  # i4: bob's cart + purchase
    assert features[2].candidates.tolist() == [5, 0, 5]


def test_keys_expire_and_the_stream_is_capped(redis_url):
    store = FeatureStore(redis_url, user_ttl_s=3600, event_ttl_s=600, stream_maxlen=10)
    store.write_events([Event("u", f"x{i % 7}", "purchase", event_id=f"e{i}") for i in range(500)])
    client = redis.Redis.from_url(redis_url)
    assert 0 < client.ttl(store.keys.user_seq("u")) <= 3600
    assert 0 < client.ttl(store.keys.user_bought("u")) <= 3600
    assert 0 < client.ttl(store.keys.event("e0")) <= 600
    assert client.xlen(store.keys.events) < 500  # MAXLEN ~ trims in whole macro nodes (~100 entries)
    assert client.llen(store.keys.user_seq("u")) == 200  # max_history


@pytest.mark.parametrize("bad", [{"max_history": 0}, {"user_ttl_s": -1}, {"item_capacity": 0}])
def test_bad_config_names_the_field(redis_url, bad):
    with pytest.raises(ValueError, match=f"FeatureStoreConfig.{next(iter(bad))}"):
        FeatureStore(redis_url, **bad)


def test_acknowledged_events_survive_a_killed_server(redis_server, redis_url):
    """SIGKILL (no shutdown, no final fsync): the append-only file already holds acknowledged events."""
    import os
    import signal

    store = FeatureStore(redis_url)
    events = [Event("u", f"item{i}", "cart", ts=float(i), event_id=f"k{i}") for i in range(50)]
    assert all(store.write_events(events))
    os.kill(redis_server.pid, signal.SIGKILL)
    while redis_server.running:  # until the kernel has taken it down
        time.sleep(0.01)
    redis_server.start()
    (u,) = store.fetch([("u", None)])
    assert u.history.tolist() == list(range(1, 51))
    assert store.write_events(events[:3]) == [False] * 3  # the idempotency markers survived too

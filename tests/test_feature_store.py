"""The Redis feature store against a real redis-server (the `redis_url` fixture)."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pyarrow as pa
import pytest
import redis

from rerank.data.dataset import load_dataset, write_dataset
from rerank.store.entry import parse_seq
from rerank.store.errors import EventValidationError, FeatureStoreError, FeatureStoreUnavailable
from rerank.store.events import Event
from rerank.store.feature_store import FeatureStore
from rerank.store.keys import Keys

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
    idx, types = parse_seq(fields["seq"])
    assert idx.tolist() == [2, 4, 4, 1] and types.tolist() == [1, 3, 4, 1]
    assert parse_seq("")[0].size == 0


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
        with pytest.raises(FeatureStoreUnavailable, match="OOM"):
            store.ensure_item_floor(5)
    finally:
        client.config_set("maxmemory", old)
    assert store.write_events([Event("u", "a", "view", event_id="oom")]) == [True]


def test_real_beauty_slice_round_trips_through_the_store(shared_data, tmp_path, redis_url):
    """Real Amazon Beauty sequences (first 300 users): the store returns each user's newest events."""
    from rerank.data.importers import import_sasrec

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
    from rerank.data.importers import import_recbole

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


# --- bounded state: idempotency markers, item capacity, item floor, server memory settings -------


def _markers(client: redis.Redis, store: FeatureStore) -> list[bytes]:
    return list(client.scan_iter(match=store.keys.event("*"), count=1000))


def test_events_without_event_id_leave_no_idempotency_marker(redis_url):
    store = FeatureStore(redis_url, event_ttl_s=600)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert store.write_events([Event(f"u{i % 3}", f"x{i % 4}", "view") for i in range(30)]) == [True] * 30
    assert _markers(client, store) == []  # nobody can retry them: nothing to recognise
    entries = client.xrange(store.keys.events)
    assert len(entries) == 30 and len({f["event_id"] for _, f in entries}) == 30  # server ids, in the stream

    keyed = [Event("v", f"x{i % 4}", "click", event_id=f"k{i}") for i in range(30)]
    assert store.write_events(keyed) == [True] * 30
    assert len(_markers(client, store)) == 30
    assert 0 < client.ttl(store.keys.event("k7")) <= 600  # event_ttl_s
    assert store.write_events(keyed[::3] + [Event("v", "x0", "click", event_id="k-new")]) == [False] * 10 + [True]
    assert client.xlen(store.keys.events) == 61
    assert store.fetch([("v", None)])[0].history.size == 31


def test_item_capacity_grows_the_catalogue_to_the_cap_and_counts_the_rest(redis_url, dataset):
    store = FeatureStore(redis_url, item_capacity=len(ITEMS) + 5)
    store.bulk_load(dataset, progress=False)
    assert store.new_item_room() == 5
    unseen = [Event("bob", f"new{i}", "purchase", ts=100.0 + i, event_id=f"n{i}") for i in range(20)]
    result = store.write_events_detailed(unseen)
    assert result.applied == [True] * 20  # stored: as events, not as catalogue items
    assert result.new_items == 5 and result.over_capacity == 15
    assert result.refused_item_ids == [f"new{i}" for i in range(5, 20)]
    assert store.new_item_room() == 0
    item_ids, _ = store.catalogue()
    assert len(item_ids) == 1 + len(ITEMS) + 5 and item_ids[-5:].tolist() == [f"new{i}" for i in range(5)]
    assert store.item_index(["new4", "new5", "new19"]).tolist() == [10, 0, 0]
    assert store.item_stats().shape == (11, 4)  # no counters for refused items

    (bob,) = store.fetch([("bob", ["new0", "new5"])])
    assert bob.history.tolist() == [2, 4, 4, 1, 6, 7, 8, 9, 10]  # idx 0 never enters a history
    assert bob.purchased.tolist() == [4, 6, 7, 8, 9, 10]
    assert bob.candidates.tolist() == [6, 0] and bob.candidate_stats.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0]]

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    entries = [f for _, f in client.xrange(store.keys.events)]
    assert [f["item_idx"] for f in entries] == [str(i) for i in range(6, 11)] + ["0"] * 15
    last_seq, _ = parse_seq(entries[-1]["seq"])
    assert 0 not in last_seq.tolist() and last_seq.tolist()[-5:] == [6, 7, 8, 9, 10]

    again = store.write_events_detailed(unseen)  # a retry: duplicates, nothing counted twice
    assert again.applied == [False] * 20 and again.new_items == 0 and again.over_capacity == 0
    assert FeatureStore(redis_url).new_item_room() is None  # no capacity configured


def test_ensure_item_floor_keeps_new_items_above_the_models(redis_url):
    store = FeatureStore(redis_url, item_capacity=102)
    assert store.ensure_item_floor(100) == 100  # an emptied Redis, a model with 100 items
    assert store.new_item_room() == 2
    result = store.write_events_detailed([Event("u", "fresh", "view"), Event("u", "fresh2", "view"),
                                          Event("u", "fresh3", "view")])  # fmt: skip
    assert (result.new_items, result.over_capacity) == (2, 1)
    assert store.item_index(["fresh", "fresh2", "fresh3"]).tolist() == [101, 102, 0]
    assert store.ensure_item_floor(50) == 102  # never lowered
    assert store.ensure_item_floor(np.int64(102)) == 102
    redis.Redis.from_url(redis_url).script_flush()  # the script cache is reloaded on demand
    assert store.ensure_item_floor(200) == 200
    assert int(redis.Redis.from_url(redis_url).get(store.keys.next_item_idx)) == 200
    for bad in (-1, True, 1.5, "10"):
        with pytest.raises(ValueError, match="n_items"):
            store.ensure_item_floor(bad)


def test_ensure_item_floor_is_atomic_under_concurrent_callers(redis_url):
    from concurrent.futures import ThreadPoolExecutor

    store = FeatureStore(redis_url, socket_timeout_s=2.0)
    floors = list(range(1, 201))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(store.ensure_item_floor, floors[::-1] + floors))
    assert all(r >= f for r, f in zip(results, floors[::-1] + floors))
    assert int(redis.Redis.from_url(redis_url).get(store.keys.next_item_idx)) == 200


def test_ensure_item_floor_when_unavailable(redis_server, redis_url):
    store = FeatureStore(redis_url)
    redis_server.stop()
    try:
        with pytest.raises(FeatureStoreUnavailable, match="ensure_item_floor"):
            store.ensure_item_floor(10)
        with pytest.raises(FeatureStoreUnavailable, match="new_item_room"):
            FeatureStore(redis_url, item_capacity=5).new_item_room()
        with pytest.raises(FeatureStoreUnavailable):
            store.check_server()
    finally:
        redis_server.start()


def test_check_server_accepts_the_embedded_server(redis_url):
    from rerank.infra.redis_server import DEFAULT_MAXMEMORY, parse_memory_size

    store = FeatureStore(redis_url)
    mem = store.server_memory()
    assert mem.policy == "noeviction" and mem.maxmemory == parse_memory_size(DEFAULT_MAXMEMORY)
    assert mem.source == "config" and mem.used_memory > 0 and mem.error is None
    assert store.check_server() == []


@pytest.fixture
def admin(redis_url):
    """A client of the session's server; restores the memory settings a test changes."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    saved = {k: client.config_get(k)[k] for k in ("maxmemory", "maxmemory-policy")}
    yield client
    for key, value in saved.items():
        client.config_set(key, value)
    client.close()


def test_check_server_reports_an_eviction_policy(redis_url, admin):
    admin.config_set("maxmemory-policy", "allkeys-lru")
    (problem,) = FeatureStore(redis_url).check_server()
    assert "maxmemory-policy is 'allkeys-lru'" in problem and "noeviction" in problem
    admin.config_set("maxmemory-policy", "volatile-ttl")
    assert "volatile-ttl" in FeatureStore(redis_url).check_server()[0]


def test_check_server_reports_unbounded_and_nearly_full_memory(redis_url, admin):
    admin.config_set("maxmemory", 0)
    (problem,) = FeatureStore(redis_url).check_server()
    assert "maxmemory is 0 (unbounded)" in problem
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", int(used * 1.05))
    (problem,) = FeatureStore(redis_url).check_server()
    assert "writes will soon be refused" in problem


def test_check_server_without_config_command(redis_server, redis_url, admin):
    """Managed Redis often forbids CONFIG: INFO memory reports the same; without either, a warning."""
    password = "pw-check-server"
    try:
        admin.execute_command("ACL", "SETUSER", "noconfig", "on", f">{password}", "~*", "+@all", "-config")
        admin.execute_command("ACL", "SETUSER", "noinfo", "on", f">{password}", "~*", "+@all", "-config", "-info")
        no_config = FeatureStore(f"redis://noconfig:{password}@127.0.0.1:{redis_server.port}/0")
        mem = no_config.server_memory()
        assert mem.source == "info" and mem.policy == "noeviction" and mem.maxmemory > 0
        assert "CONFIG GET" in mem.error and "no permissions" in mem.error
        assert no_config.check_server() == []
        admin.config_set("maxmemory-policy", "allkeys-random")
        assert "allkeys-random" in no_config.check_server()[0]

        no_info = FeatureStore(f"redis://noinfo:{password}@127.0.0.1:{redis_server.port}/0")
        mem = no_info.server_memory()
        assert mem.source == "none" and mem.maxmemory is None and mem.policy is None
        (warning,) = no_info.check_server()
        assert "could not read maxmemory" in warning and password not in warning
        assert no_info.write_events([Event("u", "a", "view")]) == [True]  # the store itself still works
    finally:
        admin.execute_command("ACL", "DELUSER", "noconfig", "noinfo")


def test_new_items_are_admitted_at_most_new_item_rate_per_min(redis_url, dataset):
    store = FeatureStore(redis_url, new_item_rate_per_min=4)
    store.bulk_load(dataset, progress=False)
    flood = [Event("eve", f"fresh{i}", "view", ts=200.0 + i) for i in range(10)]
    result = store.write_events_detailed(flood)
    assert result.applied == [True] * 10  # every event is stored ...
    assert result.new_items == 4 and result.over_rate == 6 and result.over_capacity == 0  # ... 4 join the catalogue
    assert store.item_index(["fresh3", "fresh4"]).tolist() == [len(ITEMS) + 4, 0]
    known = store.write_events_detailed([Event("eve", "fresh0", "click", ts=300.0)])  # known items are not rated
    assert known.new_items == 0 and known.over_rate == 0
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    (rate_key,) = client.keys(store.keys.new_items("*"))
    assert 0 < client.ttl(rate_key) <= 120  # the minute's counter goes away by itself


def test_idempotency_markers_are_scoped_by_tenant(redis_url):
    """The same event_id from two tenants is two events; within one tenant it is one."""
    from rerank.store.events import marker_id

    store = FeatureStore(redis_url, prefix="scope:")
    a = Event("a:u1", "i1", "view", event_id="e-1", marker_scope="a:")
    b = Event("b:u1", "i1", "view", event_id="e-1", marker_scope="b:")
    assert store.write_events([a, b]) == [True, True]
    assert store.write_events([Event("a:u1", "i1", "view", event_id="e-1", marker_scope="a:")]) == [False]
    assert store.write_events([Event("u9", "i1", "view", event_id="e-1")]) == [True]  # the shared namespace
    assert marker_id("e", "ab") != marker_id("b:e", "a") and marker_id("e") == "e"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    ids = [fields["event_id"] for _, fields in client.xrange(Keys("scope:").events)]
    assert ids == ["e-1", "e-1", "e-1"]  # the entries keep the id the client sent

"""Experiment assignment and the Redis book (rerank.experiments.book), impressions and attribution
(rerank.experiments.attribution), on a real Redis."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from pydantic import ValidationError

from rerank.experiments.attribution import AttributionConfig, ImpressionLog, read_shown
from rerank.experiments.book import (
    DEFAULT_ARM,
    INTERLEAVED_ARM,
    Experiment,
    ExperimentSpec,
    LiveBook,
    assign,
    read_book,
    servable,
    stop_experiment,
    write_experiment,
)
from rerank.store.events import Event
from rerank.store.feature_store import FeatureStore
from rerank.store.keys import Keys
from rerank.eventlog.records import Impression, event_row

USERS = [f"user{i}" for i in range(6000)]


def _exp(name: str, **spec) -> Experiment:
    return Experiment(name, ExperimentSpec.model_validate(spec))


def test_assignment_is_stable_and_follows_weights():
    book = [_exp("t", arms={"a": {"weight": 3}, "b": {"weight": 1}})]
    first = [assign(u, book).arm for u in USERS]
    assert first == [assign(u, book).arm for u in USERS]
    assert 0.72 < first.count("a") / len(first) < 0.78  # weight 3:1
    assert {assign(u, book).experiment for u in USERS} == {"t"}


def test_traffic_layers_split_users_and_a_stopped_experiment_keeps_its_range():
    book = [_exp("one", traffic=0.3, arms={"a": {}, "b": {}}), _exp("two", traffic=0.5, arms={"c": {}})]
    where = [assign(u, book).experiment for u in USERS]
    assert 0.27 < where.count("one") / len(USERS) < 0.33
    assert 0.47 < where.count("two") / len(USERS) < 0.53
    assert 0.17 < where.count("") / len(USERS) < 0.23
    stopped = [Experiment("one", book[0].spec.model_copy(update={"status": "stopped"})), book[1]]
    after = [assign(u, stopped) for u in USERS]
    assert [a.experiment for a in after if a.experiment] == ["two"] * where.count("two")  # "two" unmoved
    assert all(a.arm == DEFAULT_ARM for a, w in zip(after, where) if w == "one")


def test_a_new_salt_reshuffles_arms_and_experiments_are_independent():
    a = [assign(u, [_exp("t", salt="s1", arms={"x": {}, "y": {}})]).arm for u in USERS]
    b = [assign(u, [_exp("t", salt="s2", arms={"x": {}, "y": {}})]).arm for u in USERS]
    same = sum(x == y for x, y in zip(a, b)) / len(USERS)
    assert 0.45 < same < 0.55  # independent halves


def test_interleave_experiments_put_everyone_in_the_interleaved_arm_and_ramping_to_zero_works():
    inter = [_exp("i", type="interleave", arms={"a": {}, "b": {"model": "/m"}})]
    assert {assign(u, inter).arm for u in USERS[:100]} == {INTERLEAVED_ARM}
    ramped = [_exp("t", arms={"a": {"weight": 1}, "b": {"weight": 0}})]
    assert {assign(u, ramped).arm for u in USERS[:500]} == {"a"}


def test_specs_refuse_what_cannot_work():
    for bad, needle in [({"arms": {}}, "arms"), ({"type": "interleave", "arms": {"a": {}}}, "two arms"),
                        ({"arms": {"default": {}}}, "reserved"), ({"arms": {"a": {"weight": 0}}}, "weight > 0"),
                        ({"arms": {"a": {"model": "/m", "registry_uri": "/r"}}}, "not both"),
                        ({"arms": {"a": {"online": {"lr": 0.01}}}}, "registry_uri"),
                        ({"arms": {"a": {}}, "traffic": 1.5}, "traffic")]:
        with pytest.raises(ValidationError, match=needle):
            ExperimentSpec.model_validate(bad)
    spec = ExperimentSpec.model_validate({"arms": {"a": {}, "b": {"model": "/m"}}})
    assert servable("t", spec, "inline", ()) is None
    assert "split" in servable("t", spec, "split", ())
    online = ExperimentSpec.model_validate({"arms": {"a": {"registry_uri": "/r", "online": {}}}})
    assert "serve deploy" in servable("t", online, "inline", ())
    assert servable("t", online, "inline", ("t/a",)) is None
    relative = ExperimentSpec.model_validate({"arms": {"a": {"model": "models/m"}}})
    assert "absolute" in servable("t", relative, "inline", ())


def test_book_in_redis_round_trips_refuses_over_full_traffic_and_live_book_follows(redis_url):
    client = redis.Redis.from_url(redis_url)
    key = f"t{uuid.uuid4().hex[:8]}:experiments"
    write_experiment(client, key, "b", ExperimentSpec.model_validate({"traffic": 0.5, "arms": {"x": {}}}))
    write_experiment(client, key, "a", ExperimentSpec.model_validate({"traffic": 0.5, "arms": {"y": {}}}))
    assert [e.name for e in read_book(client, key)] == ["b", "a"]  # configured order, not sorted
    with pytest.raises(ValueError, match="traffic"):
        write_experiment(client, key, "c", ExperimentSpec.model_validate({"traffic": 0.1, "arms": {"z": {}}}))
    live = LiveBook(client, key, refresh_s=0.05)
    try:
        before = {live.assign(u).experiment for u in USERS[:300]}
        assert before == {"a", "b"}
        assert stop_experiment(client, key, "a").status == "stopped"
        assert stop_experiment(client, key, "nope") is None
        deadline = time.time() + 5
        while time.time() < deadline and "a" in {live.assign(u).experiment for u in USERS[:300]}:
            time.sleep(0.05)
        assert {live.assign(u).experiment for u in USERS[:300]} == {"b", ""}
    finally:
        live.close()


def _impression_log(redis_url: str, recent_per_user: int = 3):
    """(client, keys, ImpressionLog) under a fresh prefix, window 60 s."""
    keys = Keys(f"t{uuid.uuid4().hex[:8]}:")
    client = redis.Redis.from_url(redis_url)
    return client, keys, ImpressionLog(client, keys, AttributionConfig(window_s=60, recent_per_user=recent_per_user))


def test_impressions_are_recorded_and_events_attributed_by_request_id_then_window(redis_url):
    client, keys, log = _impression_log(redis_url)
    now = time.time()
    log.record([
        Impression("aa01", "u1", "t", "treat", "v3", now - 10, [("i1", 2.0, ""), ("i2", 1.0, ""), ("i3", 0.5, "")]),
        Impression("aa02", "u1", "t", "treat", "v3", now, [("i9", 2.0, ""), ("i2", 1.5, "")]),
        Impression("bb01", "u2", "i", "interleaved", "v1+v2", now, [("i5", 1.0, "a"), ("i6", 0.9, "b")]),
    ])
    assert client.xlen(keys.impressions) == 3
    got = log.attribute([
        ("u1", "i3", "aa01"),  # by request_id
        ("u1", "i2", None),  # by window: the newest impression that showed i2 (aa02, position 2)
        ("u1", "i7", "aa01"),  # never shown: not attributed
        ("u2", "i1", "aa01"),  # someone else's request id: not attributed
        ("u2", "i6", "bb01"),  # interleaving: the team that contributed the item
    ], now=now)
    assert [(a.request_id, a.position, a.how) for a in got] == [
        ("aa01", 3, "request_id"), ("aa02", 2, "window"), ("", None, ""), ("", None, ""), ("bb01", 2, "request_id")]
    assert (got[0].experiment, got[0].arm) == ("t", "treat")
    assert got[4].team == "b"
    # outside the window: an impression older than window_s no longer earns clicks
    assert log.attribute([("u1", "i1", "aa01")], now=now + 55)[0].how == ""
    # bounded: each user's list is trimmed, hashes expire with the window
    log.record([Impression(f"cc{i:02d}", "u3", "", "default", "v3", now, [("i1", 1.0, "")]) for i in range(10)])
    assert client.llen(keys.user_impressions("u3")) == 3
    assert client.hlen(keys.user_shown("u3")) == 3
    assert 0 < client.ttl(keys.user_shown("u1")) <= 60 and 0 < client.ttl(keys.user_impressions("u1")) <= 60
    assert read_shown(client, keys, "u2", "bb01") == {"i5": (1, "a"), "i6": (2, "b")}
    assert read_shown(client, keys, "u1", "aa01") == {"i1": (1, ""), "i2": (2, ""), "i3": (3, "")}
    assert read_shown(client, keys, "u2", "aa01") is None
    assert not client.keys(f"{keys.prefix}imp:*")  # no per-request keys


def test_attribution_state_is_bounded_per_user_and_evicted_impressions_leave_nothing(redis_url):
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    keys = Keys(prefix)
    client = redis.Redis.from_url(redis_url)
    recent = 4
    log = ImpressionLog(client, keys, AttributionConfig(window_s=60, recent_per_user=recent))
    now = time.time()
    # 3 x recent impressions of one user, in several batches; each shows its own item and a common one
    rids = [f"r{i:02d}" for i in range(3 * recent)]
    imps = [Impression(rid, "u1", "t", "treat", "v3", now - 30 + i, [(f"own{i}", 2.0, "a"), ("common", 1.0, "b")])
            for i, rid in enumerate(rids)]
    for start in range(0, len(imps), 5):
        log.record(imps[start:start + 5])
    kept = rids[-recent:]
    assert [r.decode() for r in client.lrange(keys.user_impressions("u1"), 0, -1)] == kept[::-1]
    assert sorted(f.decode() for f in client.hkeys(keys.user_shown("u1"))) == sorted(kept)
    assert set(client.keys(f"{prefix}*")) == {k.encode() for k in
                                              (keys.impressions, keys.impressions_bytes, keys.user_impressions("u1"),
                                               keys.user_shown("u1"), keys.user_seen("u1"))}
    got = log.attribute([
        ("u1", "own0", "r00"),  # evicted request id, its item in no kept impression: none
        ("u1", "common", "r01"),  # evicted request id, item shown since: the newest kept one by window
        ("u1", f"own{3 * recent - 1}", rids[-1]),  # a kept one by request_id
        ("u1", f"own{3 * recent - recent}", None),  # the oldest kept one by window
    ], now=now)
    assert [(a.request_id, a.position, a.team, a.how) for a in got] == [
        ("", None, "", ""), (rids[-1], 2, "b", "window"), (rids[-1], 1, "a", "request_id"),
        (kept[0], 1, "a", "window")]
    # re-recording a kept id (a retry) neither duplicates it nor loses a field
    log.record([imps[-1]])
    assert client.llen(keys.user_impressions("u1")) == recent and client.hlen(keys.user_shown("u1")) == recent
    # a hash left with fields no list names (the list lost): the next record drops them
    client.delete(keys.user_impressions("u1"))
    log.record([Impression("new", "u1", "t", "treat", "v3", now, [("x", 1.0, "")])])
    assert [f.decode() for f in client.hkeys(keys.user_shown("u1"))] == ["new"]


def test_users_never_attribute_each_others_events(redis_url):
    client, keys, log = _impression_log(redis_url)
    now = time.time()
    log.record([
        Impression("a1", "ua", "t", "control", "v1", now, [("i1", 2.0, ""), ("i2", 1.0, "")]),
        Impression("b1", "ub", "t", "treat", "v2", now, [("i3", 2.0, ""), ("i1", 1.0, "")]),
    ])
    got = log.attribute([
        ("ub", "i2", "a1"),  # ua's request id and item: not ub's
        ("ub", "i2", None),  # ub was never shown i2
        ("ua", "i3", "b1"),  # ub's request id and item: not ua's
        ("ub", "i1", "a1"),  # ua's request id, but ub was shown i1 too: ub's own impression, by window
        ("ua", "i1", "b1"),  # and the other way round
        ("uc", "i1", "a1"),  # a user without impressions
    ], now=now)
    assert [(a.request_id, a.position, a.arm, a.how) for a in got] == [
        ("", None, "", ""), ("", None, "", ""), ("", None, "", ""), ("b1", 2, "treat", "window"),
        ("a1", 1, "control", "window"), ("", None, "", "")]


def test_attribution_fields_reach_the_event_stream_and_parse(redis_url):
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = FeatureStore(redis_url, prefix=prefix)
    extra = {"request_id": "aa01", "position": "3", "experiment": "t", "arm": "treat", "team": "",
             "attributed": "request_id", "value": "19.5"}
    store.write_events([Event("u1", "i1", "purchase", ts=100.0, extra=extra), Event("u1", "i2", "view", ts=101.0)])
    entries = redis.Redis.from_url(redis_url, decode_responses=True).xrange(store.keys.events)
    rows = [event_row(stream_id, fields) for stream_id, fields in entries]
    assert (rows[0]["request_id"], rows[0]["position"], rows[0]["arm"], rows[0]["value"]) == ("aa01", 3, "treat", 19.5)
    assert (rows[1]["request_id"], rows[1]["position"], rows[1]["attributed"], rows[1]["value"]) == (None, None, "", None)


def test_arms_whose_model_cannot_load_are_named(tmp_path):
    from rerank.experiments.book import unreadable_model
    from rerank.models.registry import ModelRegistry

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    ModelRegistry(str(tmp_path / "empty-registry"))
    ok = ExperimentSpec.model_validate({"arms": {"a": {}, "b": {"model": str(tmp_path / "model")}}})
    assert unreadable_model(ok) is None
    no_dir = ExperimentSpec.model_validate({"arms": {"a": {"model": str(tmp_path / "nowhere")}}})
    assert "not a model directory" in unreadable_model(no_dir)
    empty = ExperimentSpec.model_validate({"arms": {"a": {"registry_uri": str(tmp_path / "empty-registry")}}})
    assert "no published version" in unreadable_model(empty)


# ---------------------------------------------------------------- arm locations limited to the app's roots
def test_arm_locations_are_accepted_only_inside_the_configured_roots(tmp_path):
    from rerank.experiments.book import check_locations, default_location_roots

    root = tmp_path / "models"
    (root / "pop").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")  # inside by name, outside once resolved
    (root / "inner").symlink_to(root / "pop")  # a symlink that stays inside is fine
    roots = [str(root), "s3://shop-models/rerank"]

    def problem(**arm):
        return check_locations(ExperimentSpec.model_validate({"arms": {"a": {}, "b": arm}}), roots)

    for ok in [{"model": str(root / "pop")}, {"model": str(root / "inner")}, {"registry_uri": str(root / "new-reg")},
               {"registry_uri": f"file://{root}/reg"}, {"registry_uri": "s3://shop-models/rerank/arm-b"},
               {"registry_uri": "s3://shop-models/rerank"}, {}]:
        assert problem(**ok) is None, ok
    refused = [
        ({"model": str(tmp_path / "outside")}, "not inside an allowed root"),
        ({"model": "/etc"}, "not inside an allowed root"),
        ({"model": str(tmp_path / "models-evil")}, "not inside an allowed root"),  # a prefix of the name only
        ({"model": f"{root}/../outside"}, "'..'"),
        ({"registry_uri": f"{root}/pop/../../outside"}, "'..'"),
        ({"model": str(root / "escape")}, "after resolving symlinks"),
        ({"registry_uri": str(root / "escape" / "reg")}, "after resolving symlinks"),
        ({"model": "models/pop"}, "not an absolute path"),
        ({"registry_uri": "s3://shop-models/rerank/arm?endpoint_override=attacker.example:80"}, "query"),
        ({"registry_uri": "s3://shop-models/rerank/arm?region=us-east-1"}, "query"),
        ({"registry_uri": "s3://other-bucket/rerank/arm"}, "same scheme, bucket"),
        ({"registry_uri": "gs://shop-models/rerank/arm"}, "same scheme, bucket"),
        ({"registry_uri": "s3://shop-models/rerank-evil/arm"}, "same scheme, bucket"),
        ({"registry_uri": "s3://shop-models/other/arm"}, "same scheme, bucket"),
        ({"registry_uri": "s3://shop-models/rerank/../other"}, "'..'"),
        ({"registry_uri": "s3://shop-models/rerank/%2E%2E/other"}, "percent"),
        ({"registry_uri": "s3://AKIA:secret@shop-models/rerank/arm"}, "credentials"),
        ({"registry_uri": "file://attacker/srv/x"}, "not inside an allowed root"),
    ]
    for arm, needle in refused:
        message = problem(**arm)
        assert message is not None and needle in message, (arm, message)
        field = next(iter(arm))
        assert message.startswith(f"arm 'b': {field} ") and f"allowed roots: {root}, s3://shop-models/rerank" in message
        assert "secret" not in message and "attacker.example" not in message  # no credentials or options echoed
    assert not (root / "new-reg").exists() and not (tmp_path / "outside" / "reg").exists()  # nothing created
    assert "none (no model_roots configured)" in check_locations(
        ExperimentSpec.model_validate({"arms": {"a": {"model": str(root / "pop")}}}), [])
    assert default_location_roots(str(root / "demo"), "s3://k:s@shop-models/rerank/registry?region=x") == [
        str(root), "s3://shop-models/rerank"]
    assert default_location_roots(None, str(tmp_path / "registry")) == [str(tmp_path)]


# ---------------------------------------------------------------- the book: atomic writes, archive, stable ranges
def _book_key() -> str:
    return f"t{uuid.uuid4().hex[:8]}:experiments"


def _spec(traffic: float, **extra) -> ExperimentSpec:
    return ExperimentSpec.model_validate({"traffic": traffic, "arms": {"x": {}, "y": {}}, **extra})


def _racing_reads(monkeypatch):
    """Make two writers read the book before either writes (a barrier after each thread's first read)."""
    import threading

    from rerank.experiments import book as book_module

    barrier, first = threading.Barrier(2, timeout=5), threading.local()
    real = book_module.read_book

    def read_book(client, key):
        out = real(client, key)
        if not getattr(first, "done", False):
            first.done = True
            barrier.wait()
        return out

    monkeypatch.setattr(book_module, "read_book", read_book)


def _in_threads(*calls):
    import threading

    results: dict[int, object] = {}

    def run(i, call):
        try:
            results[i] = call()
        except Exception as err:  # noqa: BLE001 - returned for the test to look at
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    return [results[i] for i in range(len(calls))]


def test_concurrent_writers_both_land_and_cannot_overfill_the_book(redis_url, monkeypatch):
    client = redis.Redis.from_url(redis_url)
    key = _book_key()
    _racing_reads(monkeypatch)
    out = _in_threads(lambda: write_experiment(redis.Redis.from_url(redis_url), key, "a", _spec(0.3)),
                      lambda: write_experiment(redis.Redis.from_url(redis_url), key, "b", _spec(0.3)))
    assert not any(isinstance(o, Exception) for o in out), out
    book = read_book(client, key)
    assert sorted(e.name for e in book) == ["a", "b"]
    assert set(json.loads(client.hget(key, "_order"))) == {"a", "b"}  # neither writer's entry lost
    spans = sorted((e.start, e.start + e.spec.traffic) for e in book)
    assert spans[0][1] <= spans[1][0] + 1e-9  # disjoint ranges
    # two writers each taking 0.6 of a book with 0.4 free: one lands, the other is refused
    key2 = _book_key()
    _racing_reads(monkeypatch)
    out = _in_threads(lambda: write_experiment(redis.Redis.from_url(redis_url), key2, "c", _spec(0.6)),
                      lambda: write_experiment(redis.Redis.from_url(redis_url), key2, "d", _spec(0.6)))
    errors = [o for o in out if isinstance(o, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], ValueError) and "traffic" in str(errors[0])
    assert len(read_book(client, key2)) == 1 and sum(e.spec.traffic for e in read_book(client, key2)) == 0.6


def test_a_stopped_experiment_is_archived_to_free_its_range(redis_url):
    from rerank.experiments.book import archive_experiment

    client = redis.Redis.from_url(redis_url)
    key = _book_key()
    write_experiment(client, key, "full", _spec(1.0))
    with pytest.raises(ValueError, match="is running; stop it first"):
        archive_experiment(client, key, "full")
    stop_experiment(client, key, "full")
    with pytest.raises(ValueError, match=r"adds up to 2; at most 1.*until archived \(full\)"):
        write_experiment(client, key, "next", _spec(1.0))  # a stopped experiment still holds its range
    assert archive_experiment(client, key, "full").status == "stopped"
    assert archive_experiment(client, key, "full") is None  # gone
    assert archive_experiment(client, key, "never") is None
    assert stop_experiment(client, key, "never") is None
    write_experiment(client, key, "next", _spec(1.0))
    assert [(e.name, e.start) for e in read_book(client, key)] == [("next", 0.0)]
    assert client.hkeys(key) and b"full" not in client.hkeys(key)


@pytest.mark.parametrize("legacy", [False, True], ids=["stored-starts", "book-without-starts"])
def test_archiving_an_earlier_experiment_moves_no_user_of_a_later_one(redis_url, legacy):
    from rerank.experiments.book import archive_experiment

    client = redis.Redis.from_url(redis_url)
    key = _book_key()
    specs = {"first": _spec(0.3), "second": _spec(0.3), "third": _spec(0.4)}
    if legacy:  # a book written before range starts were stored: "_order" a list, ranges in order
        client.hset(key, mapping={**{n: s.model_dump_json() for n, s in specs.items()},
                                  "_order": json.dumps(list(specs))})
    else:
        for name, spec in specs.items():
            write_experiment(client, key, name, spec)
    before = {u: assign(u, read_book(client, key)) for u in USERS}
    assert {a.experiment for a in before.values()} == {"first", "second", "third"}
    stop_experiment(client, key, "first")
    archive_experiment(client, key, "first")
    after = {u: assign(u, read_book(client, key)) for u in USERS}
    later = [u for u, a in before.items() if a.experiment in ("second", "third")]
    assert later and all((after[u].experiment, after[u].arm) == (before[u].experiment, before[u].arm) for u in later)
    assert all(after[u].experiment == "" for u, a in before.items() if a.experiment == "first")
    # a new experiment takes the freed range; the others still do not move
    write_experiment(client, key, "fourth", _spec(0.3))
    again = {u: assign(u, read_book(client, key)) for u in USERS}
    assert all((again[u].experiment, again[u].arm) == (before[u].experiment, before[u].arm) for u in later)
    assert {u for u, a in again.items() if a.experiment == "fourth"} == {
        u for u, a in before.items() if a.experiment == "first"}


def test_changing_one_experiment_never_moves_the_users_of_another(redis_url):
    client = redis.Redis.from_url(redis_url)
    key = _book_key()
    write_experiment(client, key, "a", _spec(0.3))
    write_experiment(client, key, "b", _spec(0.3))
    before = {u: assign(u, read_book(client, key)).experiment for u in USERS}
    write_experiment(client, key, "b", _spec(0.7))  # room after it: grows in place, keeps its users
    grown = {u: assign(u, read_book(client, key)).experiment for u in USERS}
    assert all(grown[u] == before[u] for u in USERS if before[u] in ("a", "b"))
    write_experiment(client, key, "b", _spec(0.3))
    grow = r"range \[0, 0.3\) can grow to 0.3 at most in place, not 0.4.*traffic to 0.*archive 'b' right after it"
    with pytest.raises(ValueError, match=grow):
        write_experiment(client, key, "a", _spec(0.4))  # b sits right after a: growing would move a's users
    write_experiment(client, key, "a", _spec(0.0))  # an explicit move: ramp to 0 ...
    with pytest.raises(ValueError, match=r"no free traffic range of 0.5 \(free: \[0, 0.3\), \[0.6, 1\)\)"):
        write_experiment(client, key, "a", _spec(0.5))  # 0.8 in all, but no gap that wide
    write_experiment(client, key, "a", _spec(0.4))  # ... then up: a takes a free range, b stays
    assert {e.name: e.start for e in read_book(client, key)} == {"a": 0.6, "b": 0.3}
    moved = {u: assign(u, read_book(client, key)).experiment for u in USERS}
    assert all(moved[u] == "b" for u in USERS if before[u] == "b")
    # the benchmark's "only this one": every other to 0, then this one to 1
    write_experiment(client, key, "b", _spec(0.0))
    write_experiment(client, key, "a", _spec(0.0))
    write_experiment(client, key, "c", _spec(0.0))
    write_experiment(client, key, "c", _spec(1.0))
    assert {assign(u, read_book(client, key)).experiment for u in USERS[:500]} == {"c"}

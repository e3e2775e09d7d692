"""Incremental training, the publish guard, and the exactly-once loop over a real Redis stream."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import redis
import torch

from rerank.online.config import OnlineConfig
from rerank.online.examples import Example, example_from_entry, is_holdout
from rerank.store.entry import parse_seq
from rerank.online.guard import PublishGuard
from rerank.online.loop import OnlineLoop
from rerank.online.trainer import IncrementalTrainer
from rerank.data.dataset import load_dataset
from rerank.models.recommender import load_model
from rerank.models.registry import ModelRegistry
from rerank.store.stream import EventStream, StreamConfig, StreamEntry

from online_helpers import synth_events, tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("online"))


@pytest.fixture
def model(tiny):
    return load_model(tiny[1])


def _examples(n: int, rng, n_items: int, pattern=lambda a: a % 10 + 1) -> list[Example]:
    """seq ending in item a -> target pattern(a): a planted rule the model has not seen."""
    out = []
    for i in range(n):
        seq = rng.integers(1, n_items + 1, size=5)
        out.append(Example(seq.astype(np.int64), np.full(5, 1, np.int64), int(pattern(seq[-1])), 1, f"e{i}"))
    return out


def test_parse_seq_and_entry():
    seq, types = parse_seq("12:1 40:4 7:purchase")
    assert seq.tolist() == [12, 40, 7] and types.tolist() == [1, 4, 4]
    assert parse_seq("")[0].tolist() == []
    with pytest.raises(ValueError, match="'x1'"):
        parse_seq("x1")
    ex = example_from_entry(StreamEntry("5-0", {"event_id": "a", "item_idx": "3", "type": "cart", "seq": "1:1 2:2"}))
    assert ex.target == 3 and ex.target_type == 3 and ex.seq.tolist() == [1, 2]
    with pytest.raises(ValueError, match="field 'type'"):
        example_from_entry(StreamEntry("5-1", {"item_idx": "3", "type": "like"}))
    with pytest.raises(ValueError, match="'item_idx' missing"):
        example_from_entry(StreamEntry("5-2", {"type": "view"}))


def test_holdout_choice_is_stable_and_about_one_in_ten():
    ids = [f"evt-{i}" for i in range(5000)]
    chosen = [is_holdout(i, 10) for i in ids]
    assert chosen == [is_holdout(i, 10) for i in ids]
    assert 0.07 < sum(chosen) / len(ids) < 0.13
    assert not any(is_holdout(i, 0) for i in ids[:100])
    salted = [is_holdout(i, 10, b"a secret salt") for i in ids]  # keyed: another, unpredictable choice
    assert salted == [is_holdout(i, 10, b"a secret salt") for i in ids] and salted != chosen
    assert 0.07 < sum(salted) / len(ids) < 0.13


def test_incremental_steps_learn_a_new_pattern(model):
    rng = np.random.default_rng(0)
    trainer = IncrementalTrainer(model, OnlineConfig(lr=3e-3, batch_size=32))
    held = _examples(200, np.random.default_rng(1), model.n_items)
    guard = PublishGuard(OnlineConfig())
    for e in held:
        guard.add(e)
    before, _ = guard.holdout_loss(model, model.n_items)
    for _ in range(30):
        trainer.step(_examples(64, rng, model.n_items))
    after, _ = guard.holdout_loss(model, model.n_items)
    assert after < before * 0.8, (before, after)


def test_new_items_get_rows_from_the_mean_and_can_be_learned(model):
    trainer = IncrementalTrainer(model, OnlineConfig(lr=3e-3))
    n0 = model.n_items
    mean = model.module.item_emb.weight[1 : n0 + 1].mean(0).detach().clone()
    assert trainer.grow(n0 + 3) == 3
    assert model.n_items == n0 + 3
    assert torch.allclose(model.module.item_emb.weight[n0 + 2], mean)
    assert model.score([np.array([1, 2])]).shape == (1, n0 + 4)
    # beyond the reserved rows (capacity n0+1+20): the table is rebuilt, old rows kept
    old_row = model.module.item_emb.weight[5].detach().clone()
    trainer.grow(n0 + 40)
    assert model.module.config.item_capacity >= n0 + 41
    assert torch.equal(model.module.item_emb.weight[5], old_row)
    new_item = n0 + 40
    rng = np.random.default_rng(2)
    ex = [Example(np.array([3, 4], np.int64), np.array([1, 1], np.int64), new_item, 1, f"n{i}") for i in range(64)]
    rank_before = int((model.score([np.array([3, 4])])[0] > model.score([np.array([3, 4])])[0, new_item]).sum())
    for _ in range(10):
        trainer.step(ex + _examples(32, rng, n0))
    scores = model.score([np.array([3, 4])])[0]
    assert int((scores > scores[new_item]).sum()) < rank_before


def _real_transitions(dataset_dir, n: int, seed: int) -> list[Example]:
    """Next-item examples from the shop's real sequences (a random cut per user)."""
    ds = load_dataset(dataset_dir)
    rng = np.random.default_rng(seed)
    out = []
    for u in rng.permutation(np.arange(1, ds.n_users + 1)):
        seq, types = ds.sequences[u].astype(np.int64), ds.event_type_sequences[u].astype(np.int64)
        if len(seq) >= 2:
            cut = int(rng.integers(1, len(seq)))
            out.append(Example(seq[:cut], types[:cut], int(seq[cut]), int(types[cut]), f"u{u}"))
        if len(out) == n:
            break
    return out


def test_guard_refuses_nan_and_sabotaged_weights_and_accepts_a_normal_update(model, tiny):
    guard = PublishGuard(OnlineConfig(guard_min_holdout=10))
    for e in _real_transitions(tiny[0], 100, seed=3):
        guard.add(e)
    serving = copy.deepcopy(model)
    base, _ = guard.holdout_loss(serving, serving.n_items)
    assert base < math.log(serving.n_items) * 0.9, "the fixture model must have learned something"
    candidate = copy.deepcopy(model)
    IncrementalTrainer(candidate, OnlineConfig(lr=5e-4)).step(_real_transitions(tiny[0], 64, seed=4))
    assert guard.check(candidate, serving).ok

    nan = copy.deepcopy(model)
    with torch.no_grad():
        nan.module.item_emb.weight[3, 0] = math.nan
    res = guard.check(nan, serving)
    assert not res.ok and "non-finite" in res.reason

    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.module.item_emb.weight.mul_(-3.0)  # a sign-flipped, scaled update
    res = guard.check(scaled, serving)
    assert not res.ok and "holdout loss" in res.reason, res

    randomised = copy.deepcopy(model)
    with torch.no_grad():
        randomised.module.item_emb.weight.normal_(0, 1.0)
    assert not guard.check(randomised, serving).ok
    assert guard.refusals == 3


# ------------------------------------------------------------------ the loop over real Redis
def _write(url: str, tiny_data, limit: int, start: int = 0):
    from rerank.store.events import Event
    from rerank.store.feature_store import FeatureStore

    store = FeatureStore(url)
    events = synth_events(tiny_data, start + limit)[start:]
    accepted = 0
    for lo in range(0, len(events), 100):
        chunk = events[lo : lo + 100]
        accepted += sum(store.write_events([Event(u, i, t, ts=ts, event_id=f"ev-{start + lo + k}")
                                            for k, (u, i, t, ts) in enumerate(chunk)]))
    store.close()
    return accepted


def _loop(url: str, registry: ModelRegistry, consumer: str = "t1", **cfg) -> OnlineLoop:
    stream = EventStream(StreamConfig(url=url, stream="rr:events", consumer=consumer, block_ms=20, claim_idle_ms=0))
    config = OnlineConfig(publish_every_s=0.0, publish_every_events=10_000, read_count=64, **cfg)
    return OnlineLoop(stream, registry, config)


def _drain(loop: OnlineLoop, rounds: int = 200) -> None:
    for _ in range(rounds):
        if loop.poll_once(block_ms=10) == 0 and not loop._uncommitted:
            return


def test_loop_publishes_versions_and_acks_everything(redis_url, tiny, tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    sent = _write(redis_url, tiny[0], 300)
    loop = _loop(redis_url, registry)
    loop.start()
    _drain(loop)
    st = loop.stats
    assert st.events_applied == sent == 300
    assert st.events_trained + st.events_heldout + st.events_invalid == sent
    assert st.events_trained > 200 and st.events_heldout > 10
    assert st.versions_published >= 2 and registry.latest() == st.version
    meta = registry.meta(registry.latest())
    assert meta["events_applied"] == sent
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    head = client.xrevrange("rr:events", count=1)[0][0]
    assert meta["trained_until_id"] == head and meta["trained_until"] == int(head.split("-")[0]) / 1000
    assert loop.stream.pending_count() == 0
    assert np.isfinite(registry.load().score([np.array([1, 2, 3])])).sum() > 0


def test_crash_before_and_after_checkpoint_loses_and_duplicates_nothing(redis_url, tiny, tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    sent = _write(redis_url, tiny[0], 400)
    first = _loop(redis_url, registry, consumer="a")
    first.start()
    # one checkpointed batch, then a checkpoint whose acks never happen (crash right after publishing),
    # then consumed entries that never reach a checkpoint (crash before publishing)
    first.poll_once(block_ms=10)
    first.stream.ack = lambda ids: 0  # the process dies before XACK from here on
    first.poll_once(block_ms=10)
    first.config.publish_every_s = 1e9
    first.poll_once(block_ms=10)
    assert first._uncommitted, "the crash must leave consumed, uncheckpointed entries"
    # a new trainer process (different consumer name: the old one is dead)
    second = _loop(redis_url, registry, consumer="b")
    second.start()
    assert second.stats.events_skipped_duplicate == 64  # the checkpointed-but-unacked batch
    _drain(second)
    assert second.stats.events_applied == sent
    assert registry.meta(registry.latest())["events_applied"] == sent
    assert registry.read_state("trainer_state.json")["events_applied"] == sent
    assert second.stream.pending_count() == 0


def test_guard_refusal_keeps_serving_version_and_counts_events(redis_url, tiny, tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    v1 = registry.publish_dir(tiny[1])
    _write(redis_url, tiny[0], 300)
    loop = _loop(redis_url, registry, guard_min_holdout=1, holdout_every=3)
    loop.start()
    loop.poll_once(block_ms=10)  # fills part of the holdout, publishes v2
    with torch.no_grad():  # sabotage the trainer's weights before its next publish
        loop.trainer.model.module.item_emb.weight.mul_(50.0)
    before = registry.latest()
    loop.poll_once(block_ms=10)
    assert loop.stats.guard_refusals == 1 and registry.latest() == before
    assert loop.stats.events_refused > 0
    # the trainer went back to the serving weights: the next publish is sane again
    _drain(loop)
    assert registry.latest() > before > v1
    assert loop.stats.events_applied == 300


def test_rollback_restores_scores_exactly_and_pauses_the_trainer(redis_url, tiny, tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    v1 = registry.publish_dir(tiny[1])
    hist = [np.array([1, 2, 3]), np.array([5])]
    v1_scores = registry.load(v1).score(hist)
    _write(redis_url, tiny[0], 200)
    loop = _loop(redis_url, registry)
    loop.start()
    _drain(loop)
    newest = registry.latest()
    assert newest > v1 and not np.array_equal(registry.load().score(hist)[:, : v1_scores.shape[1]], v1_scores)
    registry.rollback(v1)
    assert registry.latest() == v1 and registry.pinned()
    np.testing.assert_array_equal(registry.load().score(hist), v1_scores)
    _write(redis_url, tiny[0], 50, start=200)
    assert loop.poll_once(block_ms=10) == 0 and loop.stats.paused  # pinned: reads nothing
    assert registry.latest() == v1
    registry.unpin()
    _drain(loop)
    assert registry.latest() > newest
    assert registry.meta(registry.latest())["parent"] == v1
    assert loop.stats.events_applied == 250


def _counted_once(loop: OnlineLoop, sent: int) -> None:
    st = loop.stats
    assert st.events_applied == sent
    assert st.events_trained + st.events_heldout + st.events_invalid == sent  # nothing counted twice
    assert loop.registry.read_state("trainer_state.json")["events_applied"] == sent
    assert loop.stream.pending_count() == 0


def test_holdout_is_chosen_by_the_stream_entry_id_under_a_secret_salt(redis_url, tiny, tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    # a client that sends one event_id for everything: by event_id all would be held out or none
    ids = [client.xadd("rr:events", {"event_id": "steer-me", "item_idx": str(i % 60 + 1), "type": "view",
                                     "seq": f"{(7 * i) % 60 + 1}:1"}) for i in range(300)]
    client.close()
    loop = _loop(redis_url, registry)
    loop.start()
    _drain(loop)
    salt = loop.holdout_salt
    assert len(salt) == 32 and registry.read_state("holdout_salt.json")["holdout_salt"] == salt.hex()
    chosen = {i for i in ids if is_holdout(i, 10, salt)}
    assert 10 < len(chosen) < 60 and loop.stats.events_heldout == len(chosen)
    assert {e.entry_id for e in loop.guard.holdout} == chosen
    _counted_once(loop, 300)
    again = _loop(redis_url, registry, consumer="b")
    again.start()
    assert again.holdout_salt == salt  # the same choice after a restart


def test_a_crash_between_publish_and_state_write_trains_nothing_twice(redis_url, tiny, tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    sent = _write(redis_url, tiny[0], 300)
    first = _loop(redis_url, registry, consumer="a")
    first.start()
    first.poll_once(block_ms=10)  # a checkpoint: v2 and its state
    state_before = registry.read_state("trainer_state.json")
    first.stream.ack = lambda ids: 0  # the process dies before XACK ...
    first.poll_once(block_ms=10)  # ... after publishing v3 (LATEST moved) ...
    newest = registry.latest()
    assert newest == first.stats.version > state_before["version"]
    registry.write_state("trainer_state.json", state_before)  # ... and before writing its state
    second = _loop(redis_url, registry, consumer="b")
    second.start()
    assert second.stats.version == newest  # stands on the newest version, not on the state file's
    assert second.stats.trained_until_id == registry.meta(newest)["trained_until_id"]
    assert second.stats.events_skipped_duplicate == 64 and second.trainer.steps == 0  # nothing re-trained
    _drain(second)
    _counted_once(second, sent)
    assert registry.meta(newest + 1)["parent"] == newest


def test_a_pin_during_the_loops_publish_keeps_its_entries_and_counts_them_once(redis_url, tiny, tmp_path,
                                                                               monkeypatch):
    registry = ModelRegistry(str(tmp_path / "reg"))
    v1 = registry.publish_dir(tiny[1])
    sent = _write(redis_url, tiny[0], 250)
    loop = _loop(redis_url, registry)
    loop.start()
    loop.poll_once(block_ms=10)  # v2
    v2 = registry.latest()
    operator = ModelRegistry(registry.uri)  # `rerank model rollback` in another process
    original = registry._upload

    def upload(local, version):  # the pin lands while the next version uploads
        original(local, version)
        monkeypatch.setattr(registry, "_upload", original)
        operator.rollback(v1)

    monkeypatch.setattr(registry, "_upload", upload)
    assert loop.poll_once(block_ms=10) == 64
    assert registry.latest() == v1 and registry.pinned() and loop.stats.version == v2
    assert len(loop._uncommitted) == 64 and loop.stream.pending_count() == 64  # kept, not acked
    assert loop.poll_once(block_ms=10) == 0 and loop.stats.paused
    operator.unpin()
    _drain(loop)  # reloads v1, re-applies the 64 on it, goes on
    _counted_once(loop, sent)
    assert registry.meta(v2 + 1)["parent"] == v2  # the uploaded, never committed version
    assert registry.meta(v2 + 2)["parent"] == v1  # the first one after the unpin stands on the pinned one


def test_a_failed_publish_keeps_its_entries_for_the_next_checkpoint(redis_url, tiny, tmp_path, monkeypatch):
    registry = ModelRegistry(str(tmp_path / "reg"))
    v1 = registry.publish_dir(tiny[1])
    sent = _write(redis_url, tiny[0], 200)
    loop = _loop(redis_url, registry)
    loop.start()
    original = registry._upload

    def upload(local, version):  # the object store fails once
        monkeypatch.setattr(registry, "_upload", original)
        raise OSError("S3: service unavailable")

    monkeypatch.setattr(registry, "_upload", upload)
    with pytest.raises(OSError, match="service unavailable"):
        loop.poll_once(block_ms=10)
    assert registry.latest() == v1 and loop.stats.version == v1
    assert len(loop._uncommitted) == 64 and loop.stream.pending_count() == 64
    _drain(loop)  # the caller backs off and polls again: the next checkpoint covers them
    _counted_once(loop, sent)
    assert registry.meta(registry.latest())["events_applied"] == sent


def test_a_failed_state_write_after_a_publish_acks_and_a_restart_stands_on_the_version(redis_url, tiny, tmp_path,
                                                                                       monkeypatch):
    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    sent = _write(redis_url, tiny[0], 200)
    first = _loop(redis_url, registry, consumer="a")
    first.start()
    first.poll_once(block_ms=10)
    original = registry.write_state

    def write_state(name, state):
        if name == "trainer_state.json":
            monkeypatch.setattr(registry, "write_state", original)
            raise OSError("S3: slow down")
        original(name, state)

    monkeypatch.setattr(registry, "write_state", write_state)
    with pytest.raises(OSError, match="slow down"):
        first.poll_once(block_ms=10)
    newest = registry.latest()
    assert first.stats.version == newest and registry.read_state("trainer_state.json")["version"] < newest
    assert not first._uncommitted and first.stream.pending_count() == 0  # in the version: acked
    second = _loop(redis_url, registry, consumer="b")  # the first one dies here
    second.start()
    assert second.stats.version == newest and second.stats.events_applied == 128
    _drain(second)
    _counted_once(second, sent)


def test_model_freshness_counts_events_behind_the_served_version(redis_url):
    from rerank.online.freshness import model_freshness

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    ids = [client.xadd("rr:events", {"event_id": str(i)}) for i in range(5)]
    client.close()
    meta = {"created_at": 100.0, "trained_until": 90.0, "trained_until_id": ids[1]}
    f = model_freshness(meta, loaded_at=95.0, redis_url_or_client=redis_url, stream_key="rr:events", now=110.0)
    assert f["events_behind_head"] == 3 and f["stream_head_id"] == ids[-1]
    assert (f["version_age_s"], f["serving_for_s"], f["newest_event_to_serving_s"]) == (10.0, 15.0, 5.0)
    assert model_freshness({}, None, redis_url, "rr:events")["events_behind_head"] == 5  # an offline version saw none
    down = model_freshness(meta, 95.0, "redis://127.0.0.1:1/0", "rr:events", now=110.0)  # nothing listens there
    assert down["events_behind_head"] is None and down["version_age_s"] == 10.0


# ------------------------------------------------------------------ bounded state
def test_growth_never_exceeds_max_items(model):
    from rerank.online.trainer import ensure_capacity

    n0, cap0 = model.n_items, model.module.config.item_capacity
    unbounded = copy.deepcopy(model)
    assert ensure_capacity(unbounded, cap0) and unbounded.module.config.item_capacity == 2 * cap0  # doubles
    limit = cap0 + 5  # a store that assigns item_idx up to here
    trainer = IncrementalTrainer(model, OnlineConfig(max_items=limit))
    assert trainer.grow(cap0) == cap0 - n0
    assert model.module.config.item_capacity == limit + 1  # not 2 * cap0
    assert trainer.grow(limit) == limit - cap0 and model.module.config.item_capacity == limit + 1
    with pytest.raises(ValueError, match="max_items"):
        trainer.grow(limit + 1)
    beyond = [Example(np.array([1, 2], np.int64), np.array([1, 1], np.int64), limit + 3, 1, f"b{i}") for i in range(8)]
    assert math.isnan(trainer.step(beyond))  # dropped, nothing grows
    assert model.n_items == limit and model.module.config.item_capacity == limit + 1
    assert trainer.items_added == limit - n0


def _xadd(url: str, targets, seq: str = "1:1 2:1") -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    ids = [client.xadd("rr:events", {"event_id": f"x{i}-{t}", "item_idx": str(t), "type": "view", "seq": seq})
           for i, t in enumerate(targets)]
    client.close()
    return ids


def test_entries_beyond_max_items_are_skipped_and_counted(redis_url, tiny, tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    base = registry.load()
    cap0 = base.module.config.item_capacity  # 60 items + reserved rows
    limit = cap0 + 9
    new_item = cap0 + 4  # beyond the reserved rows: the table grows, to limit + 1 rows only
    sent = len(_xadd(redis_url, [i % 50 + 1 for i in range(100)] + [new_item] * 20))
    sent += len(_xadd(redis_url, [limit + 1] * 7))  # target beyond the cap
    sent += len(_xadd(redis_url, [3] * 5, seq=f"1:1 {limit + 30}:1"))  # an item beyond it in the seq
    loop = _loop(redis_url, registry, holdout_every=0, max_items=limit)
    loop.start()
    _drain(loop)
    _counted_once(loop, sent)
    assert loop.stats.events_over_max_items == 12 and loop.stats.events_invalid == 12
    assert loop.stats.events_trained == sent - 12
    published = registry.load()
    assert published.n_items == new_item and published.module.config.item_capacity == limit + 1
    assert registry.read_state("trainer_state.json")["events_over_max_items"] == 12
    assert loop.stats.items_added == new_item - base.n_items


def test_a_registry_outage_stops_reading_at_max_uncommitted_and_checkpoints_once_after(redis_url, tiny, tmp_path,
                                                                                        monkeypatch):
    registry = ModelRegistry(str(tmp_path / "reg"))
    v1 = registry.publish_dir(tiny[1])
    sent = _write(redis_url, tiny[0], 400)
    loop = _loop(redis_url, registry, holdout_every=0, max_uncommitted=150)
    loop.start()

    def down(*args, **kwargs):
        raise OSError("S3: service unavailable")

    monkeypatch.setattr(registry, "publish", down)
    monkeypatch.setattr(registry, "write_state", down)
    reads = []
    read = loop.stream.read
    monkeypatch.setattr(loop.stream, "read", lambda count, block_ms=None: reads.append(count) or read(count, block_ms))
    for _ in range(10):  # the trainer backs off and retries, for as long as the outage lasts
        with pytest.raises(OSError, match="service unavailable"):
            loop.poll_once(block_ms=10)
    assert reads == [64, 64, 22]  # up to the bound, then nothing: only the checkpoint is retried
    assert len(loop._uncommitted) == 150 and loop.stream.pending_count() == 150
    assert loop.stats.backlogged and loop.stats.events_applied == 150 and loop.stats.events_trained == 150
    assert registry.latest() == v1
    monkeypatch.undo()  # the registry is back
    loop.poll_once(block_ms=10)  # the retried checkpoint succeeds, then reading resumes
    assert not loop.stats.backlogged and registry.latest() > v1
    assert registry.meta(v1 + 1)["events_applied"] == 150
    _drain(loop)
    _counted_once(loop, sent)
    assert loop.stats.events_trained == sent and loop.stats.events_skipped_duplicate == 0


def test_items_added_counts_distinct_new_items_once(redis_url, tiny, tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    v1 = registry.publish_dir(tiny[1])
    n0 = registry.load().n_items
    loop = _loop(redis_url, registry, holdout_every=0)
    loop.start()
    _xadd(redis_url, [n0 + 1 + i % 2 for i in range(16)] + [i % 50 + 1 for i in range(48)])
    loop.poll_once(block_ms=10)  # v2 with 2 new items
    assert loop.stats.versions_published == 1 and loop.stats.items_added == 2
    with torch.no_grad():  # sabotage the candidate: the guard refuses it
        loop.trainer.model.module.item_emb.weight[1, 0] = math.nan
    _xadd(redis_url, [n0 + 3 + i % 2 for i in range(16)] + [i % 50 + 1 for i in range(48)])
    loop.poll_once(block_ms=10)
    assert loop.stats.guard_refusals == 1 and loop.stats.items_added == 2  # never in a published model
    # the trainer went back to the serving weights (n0 + 2 items) and grows n0+3, n0+4 again, plus n0+5
    _xadd(redis_url, [n0 + 3 + i % 3 for i in range(24)] + [i % 50 + 1 for i in range(40)])
    loop.poll_once(block_ms=10)
    assert registry.load().n_items == n0 + 5
    assert loop.stats.items_added == 5 and loop.trainer.items_added == 5  # not 2 + 2 + 3
    state = registry.read_state("trainer_state.json")
    assert state["items_added"] == 5 and state["items_high"] == n0 + 5
    # a rollback to v1 (no new items): regrowing them after the unpin adds nothing new
    registry.rollback(v1)
    registry.unpin()
    _xadd(redis_url, [n0 + 1 + i % 6 for i in range(24)] + [i % 50 + 1 for i in range(40)])
    loop.poll_once(block_ms=10)
    assert registry.load().n_items == n0 + 6 and loop.stats.items_added == 6
    again = _loop(redis_url, registry, consumer="b", holdout_every=0)  # a restart keeps the mark
    again.start()
    assert again.stats.items_added == 6 and again._items_high == n0 + 6


def test_entries_trimmed_before_the_trainer_read_them_are_counted_not_silent(redis_url, tiny, tmp_path):
    from rerank.store.events import Event
    from rerank.store.feature_store import FeatureStore

    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    store = FeatureStore(redis_url, stream_maxlen=100)
    events = synth_events(tiny[0], 1000)

    def write(lo: int, hi: int) -> None:
        for start in range(lo, hi, 100):
            store.write_events([Event(u, i, t, ts=ts, event_id=f"trim-{n}")
                                for n, (u, i, t, ts) in enumerate(events[start:min(hi, start + 100)], start)])

    write(0, 100)
    loop = _loop(redis_url, registry)
    loop.start()
    _drain(loop)
    assert loop.stats.events_applied == 100 and loop.stats.events_trimmed_unapplied == 0
    write(100, 1000)  # 900 more while the trainer is not reading: the cap (~100) trims most of them
    _drain(loop)
    st = loop.stats
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    kept = client.xlen("rr:events")
    assert 100 <= kept < 900
    assert st.events_trimmed_unapplied == 900 - (st.events_applied - 100) > 0  # every entry: applied or counted
    assert st.events_applied - 100 <= kept
    # a restart stands on the checkpoint's stream number: nothing counted twice, the next gap still seen
    restarted = _loop(redis_url, registry)
    restarted.start()
    _drain(restarted)
    assert restarted.stats.events_trimmed_unapplied == st.events_trimmed_unapplied
    store.close()


def test_event_types_outside_target_types_are_context_only_and_counted(redis_url, tiny, tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    for i in range(40):  # exposure pings: a view of every listed item
        client.xadd("rr:events", {"event_id": f"v{i}", "item_idx": str(i % 50 + 1), "type": "view", "seq": "1:1"})
    for i in range(30):
        client.xadd("rr:events", {"event_id": f"c{i}", "item_idx": "7", "type": "click", "seq": "1:1 3:1"})
    client.close()
    loop = _loop(redis_url, registry, holdout_every=0, target_types=["click", "cart", "purchase"])
    loop.start()
    _drain(loop)
    st = loop.stats
    assert (st.events_applied, st.events_not_target, st.events_trained, st.events_invalid) == (70, 40, 30, 0)
    assert registry.read_state("trainer_state.json")["events_not_target"] == 40
    assert loop.stream.pending_count() == 0
    with pytest.raises(ValueError, match="target_types"):
        OnlineConfig(target_types=("click", "like"))


def test_small_polls_train_in_full_batches_and_the_checkpoint_trains_the_rest(redis_url, tiny, tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    sent = len(_xadd(redis_url, [i % 50 + 1 for i in range(20)]))
    stream = EventStream(StreamConfig(url=redis_url, stream="rr:events", consumer="t1", block_ms=10, claim_idle_ms=0))
    config = OnlineConfig(publish_every_s=3600, publish_every_events=10_000, read_count=3, batch_size=8,
                          holdout_every=0)
    loop = OnlineLoop(stream, registry, config)
    loop.start()
    while loop.poll_once(block_ms=10):  # polls of 3 entries, no checkpoint due
        pass
    assert loop.stats.events_trained == sent == 20
    assert loop.trainer.steps == 2 and len(loop._batch) == 4  # two full batches of 8; 4 wait
    assert loop.checkpoint().ok
    assert loop.trainer.steps == 3 and loop._batch == []  # the checkpoint trained the rest first
    assert registry.read_state("trainer_state.json")["events_trained"] == 20


def test_trainable_items_updates_item_rows_only_and_still_learns(model):
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    rng = np.random.default_rng(0)
    trainer = IncrementalTrainer(model, OnlineConfig(lr=1e-2, batch_size=32, trainable="items"))
    examples = _examples(256, rng, model.n_items)
    first = trainer.step(examples)
    for _ in range(5):
        last = trainer.step(examples)
    assert last < first  # the item rows alone fit the planted rule better
    changed = {n for n, p in model.module.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {"item_emb.weight"}
    with pytest.raises(ValueError, match="trainable"):
        OnlineConfig(trainable="encoder")


def test_guard_refuses_a_candidate_no_worse_than_serving_but_worse_than_the_offline_baseline(model, tiny):
    """The ratchet: each version within the margin of the last could drift far from the baseline."""
    guard = PublishGuard(OnlineConfig(guard_min_holdout=10))
    for e in _real_transitions(tiny[0], 100, seed=3):
        guard.add(e)
    drifted = copy.deepcopy(model)
    with torch.no_grad():
        drifted.module.item_emb.weight.mul_(-1.0)  # what a chain of small accepted steps could reach
    candidate = copy.deepcopy(drifted)  # identical to the serving weights: within any margin of them
    assert guard.check(candidate, drifted).ok  # without an anchor it passes
    guard.anchor = copy.deepcopy(model)
    res = guard.check(candidate, drifted)
    assert not res.ok and "offline baseline" in res.reason and res.anchor_loss < res.candidate_loss, res


def test_the_loop_anchors_its_guard_on_the_newest_offline_version(redis_url, tiny, tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    offline = registry.publish_dir(tiny[1])
    _write(redis_url, tiny[0], 300)
    loop = _loop(redis_url, registry)
    loop.start()
    _drain(loop)
    assert loop.stats.version > offline and loop.guard.anchor is not None
    baseline = registry.load(offline)
    assert all(torch.equal(a, b) for a, b in zip(loop.guard.anchor.module.state_dict().values(),
                                                  baseline.module.state_dict().values()))
    restarted = _loop(redis_url, registry, consumer="t2")
    restarted.start()  # stands on a trainer version; the anchor is still the offline one
    assert restarted.stats.version == loop.stats.version
    assert all(torch.equal(a, b) for a, b in zip(restarted.guard.anchor.module.state_dict().values(),
                                                  baseline.module.state_dict().values()))


def test_the_learning_rate_warms_up_with_every_fresh_optimizer(model):
    rng = np.random.default_rng(0)
    trainer = IncrementalTrainer(model, OnlineConfig(lr=1e-3, batch_size=8, warmup_steps=10))
    trainer.step(_examples(8, rng, model.n_items))
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    trainer.step(_examples(160, rng, model.n_items))  # 20 more steps
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    trainer.reset(copy.deepcopy(model))  # a refusal or rollback: fresh optimizer, fresh warmup
    trainer.step(_examples(16, rng, model.n_items))
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_the_anchor_is_compared_only_on_items_it_knows(model, tiny):
    grown = copy.deepcopy(model)
    IncrementalTrainer(grown, OnlineConfig()).grow(model.n_items + 5)  # items the offline version lacks
    new_items = [Example(np.array([1, 2], np.int64), np.array([1, 1], np.int64), model.n_items + 1 + i % 5, 1)
                 for i in range(40)]
    guard = PublishGuard(OnlineConfig(guard_min_holdout=10))
    guard.anchor = copy.deepcopy(model)
    for e in new_items:
        guard.add(e)
    only_new = guard.check(copy.deepcopy(grown), grown)
    assert only_new.ok and only_new.anchor_loss is None and only_new.holdout == 40  # served rows, no anchor rows
    for e in _real_transitions(tiny[0], 100, seed=3):
        guard.add(e)
    mixed = guard.check(copy.deepcopy(grown), grown)
    assert mixed.ok and mixed.anchor_loss is not None

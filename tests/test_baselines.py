"""Popularity, ItemKNN and implicit-ALS MF: what each learns, save/load round trips, load errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rerank.data.dataset import leave_one_out
from rerank.models.recommender import ModelLoadError, load_model, model_class, save_model
from rerank.models.train_log import TrainLog

KINDS = ("pop", "itemknn", "mf")
FAST = {"pop": {}, "itemknn": {}, "mf": {"factors": 8, "epochs": 4}}


def two_cluster_sequences(n_users=120, seed=0):
    """Users buy within one of two item clusters (1..10 or 11..20); item 21 is a popular outlier."""
    rng = np.random.default_rng(seed)
    seqs = []
    for u in range(n_users):
        cluster = np.arange(1, 11) if u % 2 == 0 else np.arange(11, 21)
        seq = list(rng.choice(cluster, size=rng.integers(4, 9), replace=False))
        if u % 3 == 0:
            seq.insert(int(rng.integers(0, len(seq))), 21)
        seqs.append(seq)
    return seqs


def fitted(kind, ds, **options):
    model = model_class(kind).create(ds, seed=0, **{**FAST[kind], **options})
    log = TrainLog()
    model.fit(ds, leave_one_out(ds), log)
    return model, log


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_gives_identical_scores(kind, make_dataset, tmp_path):
    ds = make_dataset(two_cluster_sequences(), n_items=22)  # item 22 never seen
    model, _ = fitted(kind, ds)
    out = save_model(model, tmp_path / kind, ds)
    assert {p.name for p in out.iterdir()} >= {"config.json", "items.parquet", "weights.npz"}
    loaded = load_model(out)
    assert type(loaded) is type(model) and loaded.n_items == 22
    histories = [np.array([1, 2, 3]), np.array([15]), np.array([], dtype=np.int32), np.array([22, 21])]
    full = model.score(histories)
    assert full.shape == (4, 23) and full.dtype == np.float32
    assert np.isneginf(full[:, 0]).all() and np.isfinite(full[:, 1:]).all()
    np.testing.assert_array_equal(loaded.score(histories), full)
    candidates = np.array([[1, 5, 0], [11, 0, 21], [2, 3, 4], [22, 1, 0]])
    picked = loaded.score(histories, candidates)
    assert picked.shape == (4, 3)
    np.testing.assert_array_equal(picked[:, :2][candidates[:, :2] > 0], np.take_along_axis(full, candidates, 1)[:, :2][candidates[:, :2] > 0])
    # an unknown candidate (idx 0) gets the lowest finite score of its row
    assert picked[0, 2] == full[0, 1:].min() and picked[1, 1] == full[1, 1:].min()


@pytest.mark.parametrize("kind", ("itemknn", "mf"))
def test_personalised_baselines_follow_the_history(kind, make_dataset):
    ds = make_dataset(two_cluster_sequences(), n_items=21)
    model, _ = fitted(kind, ds)
    scores = model.score([np.array([1, 2, 3]), np.array([12, 13])])
    a, b = scores[:, 1:11], scores[:, 11:21]
    assert a[0].mean() > b[0].mean()
    assert b[1].mean() > a[1].mean()
    # a new, unseen history (fold-in / neighbour sums need no user id)
    fresh = model.score([np.array([19])])[0]
    assert fresh[11:21].mean() > fresh[1:11].mean()


def test_popularity_counts_training_events_only_and_decays(make_dataset):
    # item 9 is every user's test target: a model trained on test targets would rank it first
    seqs = [[1, 2, 3, 9], [1, 2, 4, 9], [1, 5, 3, 9], [2, 1, 6, 9]]
    ds = make_dataset(seqs, n_items=9)
    plain, _ = fitted("pop", ds, half_life=0)
    s = plain.score([np.array([1])])[0]
    assert s[9] == 0 and s[1] == 4 and s[2] == 3  # counts over training prefixes only (valid/test dropped)
    decayed, _ = fitted("pop", ds, half_life=1.0)
    d = decayed.score([np.array([1])])[0]
    # training prefixes are [1,2],[1,2],[1,5],[2,1]: with decay by position the latest item weighs 1, the one before 0.5
    assert d[2] == pytest.approx(1 + 1 + 0.5) and d[1] == pytest.approx(0.5 + 0.5 + 0.5 + 1)


def test_popularity_decays_by_time_when_the_data_has_timestamps(make_dataset):
    seqs = [[1, 2, 7, 8], [1, 3, 7, 8]]
    ts = [[0, 1000, 1001, 1002], [0, 1000, 1001, 1002]]
    ds = make_dataset(seqs, timestamps=ts, n_items=8)
    model, _ = fitted("pop", ds, half_life_days=100 / 86400)
    s = model.score([np.array([], dtype=np.int32)])[0]
    # item 1 twice at t=0, items 2 and 3 once at t=1000 (the latest training time): 2 * 0.5**10 < 1
    assert s[2] == pytest.approx(1.0) and s[1] == pytest.approx(2 * 0.5 ** 10, rel=1e-5)
    plain, _ = fitted("pop", ds, half_life_days=0)  # the positional half_life does not apply here
    assert plain.score([np.array([1])])[0][1] == 2


def test_itemknn_keeps_at_most_k_neighbours(make_dataset):
    ds = make_dataset(two_cluster_sequences(), n_items=21)
    model, log = fitted("itemknn", ds, neighbours=3)
    assert np.diff(model.indptr).max() <= 3
    assert log.records[-1]["neighbours_kept"] == len(model.indices)


def test_mf_early_stops_on_validation_and_logs_epochs(make_dataset):
    ds = make_dataset(two_cluster_sequences(), n_items=21)
    model, log = fitted("mf", ds, epochs=30, patience=2)
    epochs = [r for r in log.records if "epoch" in r]
    assert 1 <= len(epochs) <= 30
    best = max(r["valid_ndcg10"] for r in epochs)
    if len(epochs) < 30:  # stopped early: the last `patience` epochs did not beat the best
        assert all(r["valid_ndcg10"] <= best for r in epochs[-2:])
    from rerank.models.evaluate import evaluate

    # the kept factors are the best epoch's
    assert evaluate(model, ds, leave_one_out(ds), which="valid", ks=(10,))["ndcg@10"] == pytest.approx(best)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_options_are_named(kind, make_dataset):
    ds = make_dataset(two_cluster_sequences(20), n_items=21)
    with pytest.raises(ValueError, match="colour"):
        model_class(kind).create(ds, colour="red")


# --- load_model errors ------------------------------------------------------------------


@pytest.fixture
def saved_pop(make_dataset, tmp_path):
    ds = make_dataset(two_cluster_sequences(20), n_items=21)
    model, _ = fitted("pop", ds)
    return save_model(model, tmp_path / "pop", ds)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_load_errors_not_a_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(tmp_path / "nothing")


def test_load_errors_unknown_kind(saved_pop):
    _edit_config(saved_pop, kind="transformer-xl")
    with pytest.raises(ModelLoadError, match="unknown model kind 'transformer-xl'"):
        load_model(saved_pop)


def test_load_errors_wrong_kind_for_the_weights(saved_pop):
    _edit_config(saved_pop, kind="mf")
    with pytest.raises(ModelLoadError, match="item_factors"):
        load_model(saved_pop)


def test_load_errors_mismatched_n_items(saved_pop):
    _edit_config(saved_pop, n_items=30)
    with pytest.raises(ModelLoadError, match="21 items, but config.json says n_items=30"):
        load_model(saved_pop)


def test_load_errors_format_version(saved_pop):
    _edit_config(saved_pop, format_version=7)
    with pytest.raises(ModelLoadError, match="format_version 7, expected 1"):
        load_model(saved_pop)


@pytest.mark.parametrize("name", ["config.json", "items.parquet", "weights.npz"])
def test_load_errors_missing_files(saved_pop, name):
    (saved_pop / name).unlink()
    with pytest.raises(ModelLoadError, match=name):
        load_model(saved_pop)


def test_load_errors_broken_config(saved_pop):
    (saved_pop / "config.json").write_text('{"kind": "pop",\n oops')
    with pytest.raises(ModelLoadError, match="line 2: not valid JSON"):
        load_model(saved_pop)


def test_save_refuses_a_model_of_another_catalogue(saved_pop, make_dataset, tmp_path):
    other = make_dataset([[1, 2, 3]], n_items=3)
    with pytest.raises(ValueError, match="n_items"):
        save_model(load_model(saved_pop), tmp_path / "x", other)

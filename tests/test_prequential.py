"""The prequential protocol on a small synthetic shop (planted sequential pattern), and replay pacing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rerank.data.dataset import leave_one_out, load_dataset
from rerank.online.config import OnlineConfig
from rerank.online.prequential import PrequentialConfig, _rank_of_targets, run_prequential, time_split, train_dataset
from rerank.clients.replay import ReplayConfig, dataset_events, schedule
from rerank.data.synth import SynthConfig, write_synth

from online_helpers import TINY_SASREC


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    from rerank.models.sequential import SequentialRecommender

    path = tmp_path_factory.mktemp("preq") / "data"
    write_synth(path, SynthConfig(n_users=120, n_items=60, seed=5))
    dataset = load_dataset(path)
    mask, _ = time_split(dataset, 0.8)
    train = train_dataset(dataset, mask)
    torch.manual_seed(0)
    model = SequentialRecommender.create(train, seed=0, **TINY_SASREC)
    model.fit(train, leave_one_out(train))
    return dataset, model, mask


def test_time_split_keeps_catalogue_and_only_earlier_events(shop):
    dataset, _, mask = shop
    ts = dataset.events["ts"].to_numpy()
    assert 0.75 < mask.mean() < 0.85
    assert ts[mask].max() < ts[~mask].min()
    train = train_dataset(dataset, mask)
    assert train.n_items == dataset.n_items and train.events.num_rows == int(mask.sum())


def test_rank_of_targets_masks_prefix_and_padding():
    scores = np.array([[9.0, 1.0, 5.0, 3.0, 4.0]], dtype=np.float32)  # item 0 is padding
    assert _rank_of_targets(scores, np.array([3]), [np.array([2])]).tolist() == [1]  # item 4 beats it, 2 masked
    assert _rank_of_targets(scores, np.array([2]), [np.array([], dtype=np.int64)]).tolist() == [0]
    assert _rank_of_targets(scores, np.array([2]), [np.array([2])]).tolist() == [5]  # a repeat is a miss


def test_prequential_runs_all_three_systems_and_real_time_features_help(shop):
    dataset, model, mask = shop
    hist = [np.array([1, 2, 3])]
    before = model.score(hist)
    config = PrequentialConfig(chunk=64, windows=4, progress=False,
                               online=OnlineConfig(lr=1e-4, batch_size=32))
    summary = run_prequential(dataset, model, config)
    np.testing.assert_array_equal(model.score(hist), before)  # (a)/(b) model untouched by (c)
    n_test = int((~mask).sum())
    assert summary["replayed_events"] == n_test
    for name in ("static", "features", "online"):
        assert summary["systems"][name]["events"] == n_test
    assert sum(w["events"] for w in summary["windows"]) == n_test
    st = summary["online_stats"]
    assert st["trained"] + st["heldout"] <= n_test and st["heldout"] > 0 and st["published"] > 0
    # the planted successor pattern needs the latest events: real-time features must beat frozen ones
    assert summary["systems"]["features"]["ndcg@10"] > summary["systems"]["static"]["ndcg@10"]


def test_replay_schedule_and_order(shop):
    dataset = shop[0]
    events = dataset_events(dataset, limit=50)
    ts = [e["ts"] for e in events]
    assert ts == sorted(ts) and len({e["event_id"] for e in events}) == 50
    assert dataset_events(dataset, offset=10, limit=5) == events[10:15]
    due = schedule(events, ReplayConfig(url="http://x", rate=100))
    assert np.allclose(np.diff(due), 0.01)
    fast = schedule(events, ReplayConfig(url="http://x", speed=1e6, max_gap_s=0.5))
    assert np.all(np.diff(fast) >= 0) and np.all(np.diff(fast) <= 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        ReplayConfig(url="http://x", rate=1, speed=1)

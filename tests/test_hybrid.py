"""The hybrid (SASRec + ItemKNN) model: weight picked on validation, blend maths, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rerank.data.dataset import leave_one_out
from rerank.models.hybrid import WEIGHT_GRID, HybridRecommender
from rerank.models.recommender import load_model, save_model

N_ITEMS = 30
TINY = dict(d_model=32, n_heads=2, max_len=10, dropout=0.1, attn_dropout=0.1, batch_size=64, eval_every=2,
            patience=3, lr=5e-3, warmup_epochs=0.5, progress=False, device="cpu", epochs=4)


@pytest.fixture
def noisy_chain(make_dataset):
    """Item i is followed by i+1 most of the time, else by a random item."""
    rng = np.random.default_rng(0)
    sequences = []
    for start in rng.integers(0, N_ITEMS, size=200):
        seq, item = [], int(start)
        for _ in range(8):
            seq.append(item % N_ITEMS + 1)
            item = item + 1 if rng.random() < 0.8 else int(rng.integers(0, N_ITEMS))
        sequences.append(seq)
    return make_dataset(sequences, n_items=N_ITEMS)


def test_fit_picks_the_weight_with_the_best_validation_ndcg(noisy_chain):
    from rerank.models.train_log import TrainLog

    split = leave_one_out(noisy_chain)
    model = HybridRecommender.create(noisy_chain, seed=0, max_minutes=0, **TINY)
    log = TrainLog()
    model.fit(noisy_chain, split, log)
    record = [r for r in log.records if r.get("event") == "knn_weight"][-1]
    table = record["valid_ndcg10_by_weight"]
    assert set(table) == {str(w) for w in WEIGHT_GRID}
    assert model.knn_weight in WEIGHT_GRID
    assert table[str(model.knn_weight)] == max(table.values())


def test_score_is_the_mixture_of_both_distributions_over_unseen_items(noisy_chain):
    split = leave_one_out(noisy_chain)
    model = HybridRecommender.create(noisy_chain, seed=0, max_minutes=0, knn_weight=0.25, **TINY)
    model.fit(noisy_chain, split)
    histories = [np.array([3, 4, 5]), np.array([10])]
    full = model.score(histories)
    logits = torch.from_numpy(model.sasrec.score(histories))
    knn = np.clip(model.itemknn.score(histories), 0, None)
    for row, hist in enumerate(histories):
        unseen = np.setdiff1d(np.arange(1, N_ITEMS + 1), hist)
        p = torch.softmax(logits[row, unseen], 0).numpy()
        q = knn[row, unseen] / knn[row, unseen].sum()
        np.testing.assert_allclose(full[row, unseen], 0.75 * p + 0.25 * q, rtol=1e-4, atol=1e-7)
        assert np.isclose(full[row, unseen].sum(), 1.0, atol=1e-4)  # a distribution over unseen items
    assert np.isneginf(full[:, 0]).all()


def test_save_load_round_trip_gives_identical_scores(noisy_chain, tmp_path):
    split = leave_one_out(noisy_chain)
    model = HybridRecommender.create(noisy_chain, seed=1, max_minutes=0, **TINY)
    model.fit(noisy_chain, split)
    histories = [np.array([1, 2, 3]), np.array([7])]
    cands = np.array([[4, 5, 0], [8, 9, 10]])
    loaded = load_model(save_model(model, tmp_path / "hybrid", noisy_chain))
    assert isinstance(loaded, HybridRecommender) and loaded.knn_weight == model.knn_weight
    np.testing.assert_array_equal(loaded.score(histories), model.score(histories))
    np.testing.assert_array_equal(loaded.score(histories, cands), model.score(histories, cands))

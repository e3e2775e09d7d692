"""rerank.serving.scoring.score_batch: many requests in one model call, same scores as one by one."""

from __future__ import annotations

import numpy as np
import pytest

from rerank.serving.scoring import ScoreInput, score_batch


@pytest.fixture
def model(make_dataset):
    from rerank.models.sequential import SequentialRecommender

    dataset = make_dataset([[1, 2, 3, 4], [2, 3, 5, 6, 7], [8, 1, 2]], attributes={1: [1], 2: [2], 3: [1, 3]})
    return SequentialRecommender.create(dataset, seed=0, d_model=16, n_heads=2, n_layers=1, max_len=10,
                                        progress=False, device="cpu")


def one(model, history, candidates):
    hist = np.asarray(history, dtype=np.int64)
    return model.score([hist], np.asarray([candidates], dtype=np.int64), [np.full(len(hist), 4, dtype=np.int64)])[0]


def test_batch_scores_equal_single_request_scores(model):
    inputs = [
        ScoreInput(np.array([1, 2], np.int32), np.array([4, 4], np.int8), np.array([3, 4, 5], np.int32)),
        ScoreInput(np.array([5, 6, 7], np.int32), np.array([4, 4, 4], np.int8), np.array([8, 1], np.int32)),
        ScoreInput(np.array([], np.int32), np.array([], np.int8), np.array([2, 3, 4, 5, 6, 7], np.int32)),
    ]
    out = score_batch(model, inputs)
    assert [len(s) for s in out] == [3, 2, 6]
    for x, scores in zip(inputs, out):
        np.testing.assert_allclose(scores, one(model, x.history, x.candidates), rtol=1e-5, atol=1e-6)


def test_items_the_model_does_not_know_get_nan_for_the_ranker(model):
    n = model.n_items
    x = ScoreInput(np.array([1, 2], np.int32), np.array([4, 4], np.int8), np.array([3, 0, n + 5, 4], np.int32))
    scores = score_batch(model, [x])[0]
    assert np.isnan(scores[1]) and np.isnan(scores[2])
    np.testing.assert_allclose(scores[[0, 3]], one(model, [1, 2], [3, 4]), rtol=1e-5, atol=1e-6)


def test_history_items_beyond_the_model_are_dropped(model):
    n = model.n_items
    with_new = ScoreInput(np.array([1, n + 3, 2], np.int32), np.array([4, 4, 4], np.int8), np.array([3, 4], np.int32))
    without = ScoreInput(np.array([1, 2], np.int32), np.array([4, 4], np.int8), np.array([3, 4], np.int32))
    np.testing.assert_allclose(score_batch(model, [with_new])[0], score_batch(model, [without])[0], rtol=1e-6)


def test_history_is_cut_to_history_len(model):
    long = ScoreInput(np.array([5, 6, 7, 1, 2], np.int32), np.full(5, 4, np.int8), np.array([3, 4], np.int32))
    short = ScoreInput(np.array([1, 2], np.int32), np.full(2, 4, np.int8), np.array([3, 4], np.int32))
    np.testing.assert_allclose(score_batch(model, [long], history_len=2)[0], score_batch(model, [short])[0], rtol=1e-6)
    assert score_batch(model, []) == []

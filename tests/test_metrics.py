"""HR/NDCG/MRR and target ranks against rankings computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rerank.models.evaluate import mask_history
from rerank.models.metrics import MISS_RANK, metrics_from_ranks, target_ranks

NEG = -np.inf


def test_rank_counts_items_scored_above_the_target():
    scores = np.array([[NEG, 0.1, 0.9, 0.5, 0.3],
                       [NEG, 0.9, 0.8, 0.7, 0.6]], dtype=np.float32)
    # row 0: target 3 (0.5) has only item 2 (0.9) above -> rank 1; row 1: target 4 is last -> rank 3
    assert target_ranks(scores, np.array([3, 4])).tolist() == [1, 3]
    assert target_ranks(scores, np.array([2, 1])).tolist() == [0, 0]


def test_ties_are_counted_against_the_target():
    scores = np.array([[NEG, 1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    # a model that scores everything alike gains nothing: 3 tied items are ranked ahead
    assert target_ranks(scores, np.array([2])).tolist() == [3]


def test_masked_target_is_a_miss():
    scores = np.array([[NEG, 0.5, NEG, 0.1]], dtype=np.float32)
    ranks = target_ranks(scores, np.array([2]))
    assert ranks.tolist() == [MISS_RANK]
    m = metrics_from_ranks(ranks, ks=(5,))  # k larger than the catalogue: still a miss
    assert m["hr@5"] == 0.0 and m["ndcg@5"] == 0.0 and m["mrr"] < 1e-12


def test_mask_history_masks_prefix_items_and_item_zero():
    scores = np.arange(12, dtype=np.float32).reshape(2, 6)  # item 5 scores highest in both rows
    masked = mask_history(scores, [np.array([5, 3, 5]), np.array([], dtype=np.int32)]).numpy()
    assert np.isneginf(masked[:, 0]).all()
    assert np.isneginf(masked[0, [3, 5]]).all() and np.isfinite(masked[0, [1, 2, 4]]).all()
    assert np.isfinite(masked[1, 1:]).all()
    assert scores[0, 5] == 5.0  # the caller's array is untouched
    # row 0: item 5 (a prefix item) no longer outranks item 4
    assert target_ranks(masked, np.array([4, 4])).tolist() == [0, 1]


def test_metrics_by_hand():
    ranks = np.array([0, 1, 4, 9, 19, 100])
    m = metrics_from_ranks(ranks, ks=(5, 10, 20))
    assert m["users"] == 6
    assert m["hr@5"] == pytest.approx(3 / 6)
    assert m["hr@10"] == pytest.approx(4 / 6)
    assert m["hr@20"] == pytest.approx(5 / 6)
    ndcg = [1 / math.log2(r + 2) for r in (0, 1, 4, 9, 19)]
    assert m["ndcg@5"] == pytest.approx(sum(ndcg[:3]) / 6)
    assert m["ndcg@10"] == pytest.approx(sum(ndcg[:4]) / 6)
    assert m["ndcg@20"] == pytest.approx(sum(ndcg) / 6)
    assert m["mrr"] == pytest.approx(sum(1 / (r + 1) for r in ranks) / 6)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(np.array([[NEG, np.nan, 1.0]]), np.array([2]))
    with pytest.raises(ValueError, match="column indices"):
        target_ranks(np.zeros((1, 3)), np.array([3]))
    with pytest.raises(ValueError, match="shape|must be"):
        target_ranks(np.zeros((2, 3)), np.array([1]))

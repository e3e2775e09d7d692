"""The leave-one-out full-ranking protocol: exact ranks, masking, and no leakage of the target."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from rerank.data.dataset import leave_one_out
from rerank.models.evaluate import compare, evaluate, format_table, plot_comparison
from rerank.models.recommender import Recommender, save_model


class FixedScores(Recommender):
    """Scores every item by a fixed vector, whatever the history (records what it was shown)."""

    kind = "fixed-test"

    def __init__(self, item_scores: np.ndarray) -> None:
        self.item_scores = np.asarray(item_scores, dtype=np.float32)
        self.n_items = len(self.item_scores) - 1
        self.seen: list[list[int]] = []

    @classmethod
    def create(cls, dataset, seed=0, **options):
        return cls(np.zeros(dataset.n_items + 1))

    def fit(self, dataset, split, log=None):
        pass

    def score(self, histories, candidates=None, event_types=None):
        self.seen += [list(map(int, h)) for h in histories]
        full = np.tile(self.item_scores, (len(histories), 1))
        full[:, 0] = -np.inf
        return full

    def save_weights(self, path: Path) -> dict:
        np.savez(path / "weights.npz", item_scores=self.item_scores)
        return {}

    @classmethod
    def load_weights(cls, path, config):
        with np.load(path / "weights.npz", allow_pickle=False) as w:
            return cls(w["item_scores"])


class Peeking(FixedScores):
    """Puts all its weight on the last item it is shown: a perfect score if the target leaked in."""

    def score(self, histories, candidates=None, event_types=None):
        full = np.zeros((len(histories), self.n_items + 1), dtype=np.float32)
        for row, h in enumerate(histories):
            if len(h):
                full[row, h[-1]] = 1.0
        full[:, 0] = -np.inf
        return full


SEQUENCES = [
    [1, 2, 3, 4, 5],  # user 1: valid target 4, test target 5
    [6, 5, 4, 3],     # user 2: valid 4, test 3
    [2, 2, 1],        # user 3: valid 2 (in its own prefix -> a miss), test 1
    [7, 8],           # user 4: too short, training only
]


def test_exact_ranks_with_prefix_masking(make_dataset):
    ds = make_dataset(SEQUENCES, n_items=8)
    split = leave_one_out(ds)
    assert split.users.tolist() == [1, 2, 3]
    model = FixedScores(np.array([0, 8, 7, 6, 5, 4, 3, 2, 1]))  # item 1 best ... item 8 worst
    # test: user 1 prefix {1,2,3,4}, target 5 -> ahead of it: nothing -> rank 0
    #       user 2 prefix {6,5,4}, target 3 -> ahead: 1, 2 -> rank 2
    #       user 3 prefix {2,2}, target 1 -> rank 0
    ranks = [0, 2, 0]
    m = evaluate(model, ds, split, which="test", ks=(1, 2, 3))
    assert m["users"] == 3
    assert m["hr@1"] == pytest.approx(2 / 3) and m["hr@3"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx(sum(1 / math.log2(r + 2) for r in ranks) / 3)
    assert m["mrr"] == pytest.approx(sum(1 / (r + 1) for r in ranks) / 3)
    # valid: user 1 prefix {1,2,3}, target 4 -> rank 0; user 2 prefix {6,5}, target 4 -> 1,2,3 ahead -> 3;
    #        user 3 prefix {2}, target 2 is in its own prefix -> masked -> a miss
    v = evaluate(model, ds, split, which="valid", ks=(1, 4, 20))
    assert v["hr@1"] == pytest.approx(1 / 3) and v["hr@4"] == pytest.approx(2 / 3) and v["hr@20"] == pytest.approx(2 / 3)
    assert v["mrr"] == pytest.approx((1 + 1 / 4) / 3, abs=1e-9)


def test_model_sees_exactly_the_prefix(make_dataset):
    ds = make_dataset(SEQUENCES, n_items=8)
    split = leave_one_out(ds)
    model = FixedScores(np.arange(9))
    evaluate(model, ds, split, which="test", batch_size=2)
    assert model.seen == [[1, 2, 3, 4], [6, 5, 4], [2, 2]]
    model.seen = []
    evaluate(model, ds, split, which="valid")
    assert model.seen == [[1, 2, 3], [6, 5], [2]]


def test_a_model_that_would_profit_from_a_leak_gets_nothing(make_dataset):
    # Peeking bets everything on the last item of its input. If the evaluation let the target
    # into the input it would hit every time; with the true prefix its bet is a masked item
    rng = np.random.default_rng(0)
    seqs = [list(rng.choice(np.arange(1, 30), size=6, replace=False)) for _ in range(40)]
    ds = make_dataset(seqs, n_items=30)
    split = leave_one_out(ds)
    m = evaluate(Peeking(np.zeros(31)), ds, split, which="test", ks=(1,))
    # with every item but one tied at 0 and ties counted against the target, hr@1 must be 0
    assert m["hr@1"] == 0.0
    # the same model given the full sequence (the leak) would score hr@1 = 1: the guard is real
    leaked = Peeking(np.zeros(31)).score([ds.sequences[u] for u in split.users])
    assert (leaked.argmax(axis=1) == split.test_target[split.users]).all()


def test_batch_size_and_user_subsets(make_dataset):
    rng = np.random.default_rng(1)
    seqs = [list(rng.integers(1, 50, size=rng.integers(3, 12))) for _ in range(64)]
    ds = make_dataset(seqs, n_items=50)
    split = leave_one_out(ds)
    model = FixedScores(rng.random(51))
    whole = evaluate(model, ds, split, batch_size=512)
    assert evaluate(model, ds, split, batch_size=3) == whole
    subset = evaluate(model, ds, split, users=split.users[:10])
    assert subset["users"] == 10
    with pytest.raises(ValueError, match="which"):
        evaluate(model, ds, split, which="train")
    with pytest.raises(ValueError, match="without a test target"):
        evaluate(model, ds, split, users=np.array([0]))


def test_wrong_score_shape_is_refused(make_dataset):
    ds = make_dataset(SEQUENCES, n_items=8)
    with pytest.raises(ValueError, match="shape"):
        evaluate(FixedScores(np.zeros(5)), ds, leave_one_out(ds))


def test_compare_table_and_plot(make_dataset, tmp_path, monkeypatch):
    from rerank.models import recommender

    monkeypatch.setitem(recommender.MODEL_KINDS, "fixed-test", FixedScores)
    ds = make_dataset(SEQUENCES, n_items=8)
    split = leave_one_out(ds)
    good = save_model(FixedScores(np.array([0, 8, 7, 6, 5, 4, 3, 2, 1])), tmp_path / "good", ds)
    bad = save_model(FixedScores(np.arange(9)), tmp_path / "bad", ds)
    rows = compare([good, bad], ds, split)
    assert [r["model"] for r in rows] == [str(good), str(bad)]
    assert rows[0]["ndcg@10"] > rows[1]["ndcg@10"]
    text = format_table(rows)
    assert "good (fixed-test)" in text and "ndcg@10" in text
    png = plot_comparison(rows, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""List-level re-ranking: score order, MMR diversity, exclusions, boosts, cold start, top-k."""

from __future__ import annotations

import numpy as np
import pytest

from rerank.serving.ranking import SCORE_LIMIT, RankingRules, attribute_features, dpp, mmr, popularity_prior, rank

IDS = ["a", "b", "c", "d", "e"]
IDX = np.array([1, 2, 3, 4, 5])
SCORES = np.array([0.1, 0.9, 0.5, 0.7, 0.3])


def ids(result):
    return [item_id for item_id, _ in result]


def test_pure_score_order_when_diversity_is_zero():
    attrs = np.array([[1], [1], [1], [2], [2]])
    result = rank(IDS, IDX, SCORES, rules=RankingRules(k=5, diversity=0.0), attributes=attrs)
    assert ids(result) == ["b", "d", "c", "e", "a"]
    assert [s for _, s in result] == pytest.approx([0.9, 0.7, 0.5, 0.3, 0.1])


def test_mmr_increases_attribute_diversity_of_the_top_k():
    # three near-duplicates from brand 1 score highest; brand 2 and 3 items a bit lower
    cand = [f"x{i}" for i in range(6)]
    scores = np.array([1.0, 0.99, 0.98, 0.8, 0.79, 0.7])
    attrs = np.array([[1, 10], [1, 10], [1, 10], [2, 20], [2, 20], [3, 30]])
    plain = rank(cand, np.arange(1, 7), scores, rules=RankingRules(k=3), attributes=attrs)
    diverse = rank(cand, np.arange(1, 7), scores, rules=RankingRules(k=3, diversity=0.5), attributes=attrs)

    def n_brands(result):
        return len({attrs[cand.index(i)][0] for i in ids(result)})

    assert n_brands(plain) == 1
    assert n_brands(diverse) == 3
    assert ids(diverse)[0] == "x0"  # the best item still leads


def test_mmr_with_lambda_zero_is_score_order_and_respects_k():
    scores = np.array([0.2, 0.8, 0.5])
    feats = np.eye(3)
    assert mmr(scores, feats, 0.0, 2).tolist() == [1, 2]
    assert mmr(scores, feats, 0.7, 10).tolist() == [1, 2, 0]  # orthogonal items: no penalty, k capped
    assert mmr(np.zeros(0), np.zeros((0, 3)), 0.5, 3).size == 0


def test_attribute_features_ignores_padding():
    feats = attribute_features(np.array([[5, 0], [5, 7], [0, 0]]))
    assert feats.tolist() == [[1, 0], [1, 1], [0, 0]]


def test_exclusions_of_purchased_and_explicit_items():
    rules = RankingRules(k=5, exclude_items=["d"])
    result = rank(IDS, IDX, SCORES, rules=rules, purchased_idx=np.array([2, 99]))
    assert ids(result) == ["c", "e", "a"]
    keep_bought = RankingRules(k=5, exclude_purchased=False)
    assert "b" in ids(rank(IDS, IDX, SCORES, rules=keep_bought, purchased_idx=np.array([2])))


def test_unknown_items_are_not_excluded_as_purchased():
    # idx 0 (unknown) must never match a purchase record
    result = rank(["new", "a"], np.array([0, 1]), np.array([0.0, 1.0]), rules=RankingRules(k=2),
                  purchased_idx=np.array([0, 1]))
    assert ids(result) == ["new"]


def test_boost_is_additive():
    result = rank(IDS, IDX, SCORES, rules=RankingRules(k=2, boost={"a": 1.0, "zzz": 5.0}))
    assert ids(result) == ["a", "b"]
    assert result[0][1] == pytest.approx(1.1)


def test_k_larger_than_candidates_returns_all():
    assert len(rank(IDS, IDX, SCORES, rules=RankingRules(k=50))) == 5
    assert len(rank(IDS, IDX, SCORES, rules=RankingRules(k=50, diversity=0.3), attributes=np.ones((5, 1)))) == 5
    assert rank([], np.zeros(0), np.zeros(0), rules=RankingRules()) == []


def test_ties_keep_input_order_and_repeat_identically():
    scores = np.array([0.5, 0.5, 0.5, 0.9, 0.5])
    first = rank(IDS, IDX, scores, rules=RankingRules(k=5))
    assert ids(first) == ["d", "a", "b", "c", "e"]
    attrs = np.array([[1], [1], [2], [3], [2]])
    div = [rank(IDS, IDX, scores, rules=RankingRules(k=5, diversity=0.4), attributes=attrs) for _ in range(3)]
    assert div[0] == div[1] == div[2]


def test_cold_start_places_unknown_items_by_popularity():
    cand = ["k1", "k2", "k3", "new-popular", "new-unseen"]
    idx = np.array([1, 2, 3, 0, 0])
    scores = np.array([3.0, 2.0, 1.0, -np.inf, -np.inf])
    popularity = np.array([1.0, 1.0, 1.0, 9.0, 0.0])
    rules = RankingRules(k=5, cold_start_weight=0.5)
    result = dict(rank(cand, idx, scores, rules=rules, popularity=popularity))
    assert result["new-popular"] == pytest.approx(2.0)  # the median of known scores
    assert result["new-unseen"] == pytest.approx(1.0)  # no events: the bottom of the known scores
    top = rank(cand, idx, scores, rules=RankingRules(k=5, cold_start_weight=1.0), popularity=popularity)
    assert ids(top)[:2] == ["k1", "new-popular"]  # weight 1: up to the best known score; ties: input order
    assert top[1][1] == pytest.approx(3.0)
    assert all(np.isfinite(s) for _, s in top)


def test_all_unknown_candidates_rank_by_popularity():
    result = rank(["p", "q", "r"], np.zeros(3), np.full(3, np.nan), rules=RankingRules(k=3),
                  popularity=np.array([1.0, 3.0, 2.0]))
    assert ids(result) == ["q", "r", "p"]


def test_popularity_prior_weights_purchases_most():
    prior = popularity_prior(np.array([[8, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]), 3)
    assert prior[0] == pytest.approx(prior[1]) and prior[2] == 0.0
    assert popularity_prior(None, 2).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"k": 0}, "k"), ({"diversity": 1.5}, "diversity"), ({"cold_start_weight": -1}, "cold_start_weight")],
)
def test_invalid_rules_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=rf"RankingRules\.{message}"):
        RankingRules(**kwargs)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="scores has 2 entries for 5 candidate ids"):
        rank(IDS, IDX, SCORES[:2], rules=RankingRules())


def test_items_newer_than_the_model_are_cold():
    cand = ["old1", "old2", "newer"]
    idx = np.array([1, 2, 3])
    scores = np.array([1.0, 0.0, 5.0])  # the model's row for idx 3 is untrained noise
    result = dict(rank(cand, idx, scores, rules=RankingRules(k=3, cold_start_weight=0.0), known_items=2))
    assert result["newer"] == pytest.approx(0.0)  # bottom of the known scores, not 5.0
    assert dict(rank(cand, idx, scores, rules=RankingRules(k=3)))["newer"] == 5.0


def _brand_case():
    cand = [f"x{i}" for i in range(6)]
    scores = np.array([1.0, 0.99, 0.98, 0.8, 0.79, 0.7])
    attrs = np.array([[1, 10], [1, 10], [1, 10], [2, 20], [2, 20], [3, 30]])
    return cand, scores, attrs


def test_dpp_increases_attribute_diversity_of_the_top_k():
    cand, scores, attrs = _brand_case()
    rules = RankingRules(k=3, diversity=0.5, diversity_method="dpp")
    result = rank(cand, np.arange(1, 7), scores, rules=rules, attributes=attrs)
    assert ids(result)[0] == "x0"
    assert len({attrs[cand.index(i)][0] for i in ids(result)}) == 3


def test_dpp_tends_to_score_order_and_fills_up_after_duplicates():
    from rerank.serving.ranking import dpp

    scores = np.array([0.3, 0.9, 0.5, 0.7])
    feats = np.eye(4)
    assert dpp(scores, feats, 1e-4, 4).tolist() == [1, 3, 2, 0]
    same = np.ones((4, 1))  # identical items: after the first, nothing adds volume
    assert dpp(scores, same, 0.5, 3).tolist() == [1, 3, 2]
    assert dpp(scores, feats, 0.5, 10).tolist()[0] == 1 and len(dpp(scores, feats, 0.5, 10)) == 4


def test_unknown_diversity_method_is_refused():
    with pytest.raises(ValueError, match=r"RankingRules\.diversity_method: expected one of mmr\|dpp, got 'xyz'"):
        RankingRules(diversity_method="xyz")


# ---------------------------------------------------------------- non-finite inputs (defence in depth)
_ATTRS = np.array([[1], [1], [2], [3], [2]])


def _assert_renderable_and_distinct(result, n):
    import json

    assert len(result) == n
    assert len(set(ids(result))) == n  # no item twice
    assert all(isinstance(s, float) and np.isfinite(s) for _, s in result)
    json.dumps(result, allow_nan=False)  # what the ingress renders; raises on NaN/inf


@pytest.mark.parametrize("method", ["mmr", "dpp"])
@pytest.mark.parametrize(
    "boost",
    [
        {"a": float("-1e309")},  # JSON 1e309 parses to inf
        {"a": float("1e309")},
        {"a": float("nan")},
        {"a": 1e308, "b": -1e308},  # finite, but their difference overflows
        {"a": float("-inf"), "c": float("inf")},
    ],
)
def test_absurd_boosts_give_finite_scores_and_distinct_items(method, boost):
    rules = RankingRules(k=5, diversity=0.5, diversity_method=method, boost=boost)
    result = rank(IDS, IDX, SCORES, rules=rules, attributes=_ATTRS)
    _assert_renderable_and_distinct(result, 5)


def test_huge_negative_boost_sinks_the_item_and_huge_positive_pins_it():
    # with diversity: MMR used to return 'a' five times (-inf gain - inf penalty ties at index 0)
    sunk = rank(IDS, IDX, SCORES, rules=RankingRules(k=5, diversity=0.5, boost={"a": float("-inf")}), attributes=_ATTRS)
    assert ids(sunk)[-1] == "a" and ids(sunk)[:4] == ["b", "d", "c", "e"]
    assert sunk[-1][1] == pytest.approx(-SCORE_LIMIT, rel=1e-9)
    pinned = rank(IDS, IDX, SCORES, rules=RankingRules(k=2, boost={"e": float("inf")}))
    assert ids(pinned) == ["e", "b"] and pinned[0][1] == SCORE_LIMIT


def test_nan_boost_counts_as_no_boost():
    result = rank(IDS, IDX, SCORES, rules=RankingRules(k=5, boost={"b": float("nan")}))
    assert ids(result) == ["b", "d", "c", "e", "a"]
    assert dict(result)["b"] == pytest.approx(0.9)


@pytest.mark.parametrize("diversity", [0.0, 0.4])
def test_non_finite_model_scores_and_popularity_give_finite_scores(diversity):
    scores = np.array([np.nan, np.inf, -np.inf, 1e308, -1e308])
    popularity = np.array([np.nan, np.inf, 1.0, 2.0, 3.0])
    rules = RankingRules(k=5, diversity=diversity)
    result = rank(IDS, IDX, scores, rules=rules, attributes=_ATTRS, popularity=popularity)
    _assert_renderable_and_distinct(result, 5)
    assert ids(result)[0] == "d"  # the only huge finite score still leads


@pytest.mark.parametrize("select", [mmr, dpp])
def test_diversifiers_never_repeat_items_on_non_finite_input(select):
    for scores in (np.full(4, np.nan), np.array([-np.inf, -np.inf, 1.0, np.inf]), np.array([1e308, -1e308, 0.0, 1.0])):
        picked = select(scores, np.eye(4), 0.5, 4).tolist()
        assert sorted(picked) == [0, 1, 2, 3], (scores, picked)
    nan_features = np.full((4, 2), np.nan)
    assert sorted(select(np.array([1.0, 2.0, 3.0, 4.0]), nan_features, 0.5, 4).tolist()) == [0, 1, 2, 3]

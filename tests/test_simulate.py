"""The live simulator's ground truth: choice model, drift, candidates, funnel and the HTTP payloads.

The end-to-end run against the real service belongs to the service's own tests; here the HTTP
client logic is tested through its pure parts (request bodies, event payloads, retry delays).
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from rerank.serving.api import EventsRequest, RankRequest, RankResponse
from rerank.cli.main import main
from rerank.clients.simulate import (
    PRICE_BASE,
    PRICE_GROWTH,
    ArmStats,
    CandidateMix,
    ChoiceModel,
    Drift,
    Outcome,
    ShopTruth,
    SimUser,
    click_probability,
    draw_candidates,
    events_payload,
    expected_clicks,
    ideal_order,
    maybe_drift,
    new_user,
    rank_body,
    react,
    remember_clicks,
    retry_delay,
    user_schedule,
)
from rerank.data.synth import SynthConfig, generate_shop, write_synth

SMALL = SynthConfig(n_users=50, n_items=200)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "shop"
    write_synth(out, SMALL)
    return out


@pytest.fixture(scope="module")
def truth(data_dir) -> ShopTruth:
    return ShopTruth.from_dataset(data_dir)


def _user(truth: ShopTruth, seed: int = 0) -> SimUser:
    return new_user(truth, f"sim-{seed}", np.random.default_rng(seed))


def test_truth_is_the_regenerated_shop(truth):
    shop = generate_shop(SMALL)
    assert truth.n_items == 200 and truth.n_categories == SMALL.categories
    assert truth.item_ids[1:] == shop.items["item_id"].to_pylist() and truth.item_ids[1] == "sku001"
    assert truth.index["sku001"] == 1 and truth.index["sku200"] == 200
    np.testing.assert_array_equal(truth.category, shop.item_category)
    np.testing.assert_array_equal(truth.successors, shop.successors)
    bands = set(np.round(PRICE_BASE * PRICE_GROWTH ** np.arange(SMALL.n_price_bands), 2))
    assert set(truth.price[1:]) <= bands and len(set(truth.price[1:])) > 1


def test_not_a_synth_dataset(tmp_path):
    with pytest.raises(ValueError, match="synth_config.json"):
        ShopTruth.from_dataset(tmp_path)


def test_deterministic_per_seed(truth):
    def run(seed: int):
        rng = np.random.default_rng(seed)
        user = new_user(truth, "u", rng)
        candidates = draw_candidates(truth, user, 50, CandidateMix(), rng)
        outcome = ChoiceModel().simulate(ChoiceModel().attractiveness(truth, user, candidates[:10]), rng)
        return user.interests, candidates, outcome.clicked

    for a, b in zip(run(3), run(3)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(run(3)[1], run(4)[1])


def test_examination_decreases_with_position():
    examine = ChoiceModel().examination(10)
    assert examine[0] == 1.0 and np.all(np.diff(examine) < 0)
    assert examine[1] == pytest.approx(0.5)
    assert np.all(ChoiceModel(eta=0.0).examination(5) == 1.0)  # no position bias
    assert np.all(ChoiceModel(eta=2.0).examination(5)[1:] < examine[1:5])


def test_attractive_first_beats_reversed(truth):
    model, user = ChoiceModel(), _user(truth)
    items = np.arange(1, truth.n_items + 1)
    attract = model.attractiveness(truth, user, items)
    assert np.all((attract > 0) & (attract < 1))
    best = attract[ideal_order(attract)][:10]
    examine = model.examination(10)
    assert np.all(np.diff(best) <= 0)
    assert expected_clicks(examine, best) > expected_clicks(examine, best[::-1])
    assert click_probability(examine, best) > click_probability(examine, best[::-1])
    assert expected_clicks(examine, best) >= expected_clicks(examine, attract[:10])


def test_interest_and_popularity_raise_attractiveness(truth):
    model, user = ChoiceModel(), _user(truth)
    items = np.arange(1, truth.n_items + 1)
    attract = model.attractiveness(truth, user, items)
    favourite = int(np.argmax(user.interests))
    liked, other = truth.category[items] == favourite, user.interests[truth.category[items]] < 0.01
    assert attract[liked].mean() > 3 * attract[other].mean()
    assert model.attractiveness(truth, user, np.array([0]))[0] == 0.0  # unknown item


def test_successors_raise_attractiveness(truth):
    model, user = ChoiceModel(), _user(truth)
    clicked = 5
    successors = np.unique(truth.successors[clicked])
    others = np.setdiff1d(np.arange(1, truth.n_items + 1), successors)
    before = model.attractiveness(truth, user, successors)
    others_before = model.attractiveness(truth, user, others)
    remember_clicks(user, np.array([clicked]), model.memory)
    assert np.all(model.attractiveness(truth, user, successors) > before)
    np.testing.assert_array_equal(model.attractiveness(truth, user, others), others_before)
    remember_clicks(user, np.array([1, 2, 3]), model.memory)  # the click on 5 leaves the memory of 3
    assert user.recent_clicks == [1, 2, 3]


def test_drift_changes_interests_when_due(truth):
    user, rng = _user(truth), np.random.default_rng(1)
    start = user.interests.copy()
    drift = Drift(every=3, probability=1.0, share=0.5)
    assert [maybe_drift(truth, user, drift, rng) for _ in range(6)] == [False, False, True, False, False, True]
    assert not np.allclose(user.interests, start)
    assert user.interests.sum() == pytest.approx(1.0) and np.all(user.interests >= 0)
    still = _user(truth)
    for _ in range(9):
        assert not maybe_drift(truth, still, Drift(every=3, probability=0.0), rng)
        assert not maybe_drift(truth, still, Drift(every=0, probability=1.0), rng)
    np.testing.assert_array_equal(still.interests, start)


def test_candidates_unique_valid_and_counted(truth):
    rng, user = np.random.default_rng(2), _user(truth)
    user.recent_clicks = [7, 8]
    for n in (1, 10, 100, 200, 500):
        candidates = draw_candidates(truth, user, n, CandidateMix(), rng)
        assert len(candidates) == min(n, truth.n_items) == len(set(candidates.tolist()))
        assert candidates.min() >= 1 and candidates.max() <= truth.n_items
    successors = set(truth.successors[[7, 8]].ravel().tolist())
    only_successors = draw_candidates(truth, user, 4, CandidateMix(0, 1, 0, 0), rng)
    assert set(only_successors.tolist()) <= successors
    only_interest = draw_candidates(truth, user, 30, CandidateMix(1, 0, 0, 0), rng)
    liked = user.interests[truth.category[only_interest]].mean()
    assert liked > user.interests[truth.category[1:]].mean()
    assert CandidateMix().quotas(100) == [50, 15, 20, 15] and sum(CandidateMix().quotas(7)) == 7
    with pytest.raises(ValueError):
        CandidateMix(0, 0, 0, 0).quotas(10)


def test_funnel_consistency_and_click_rate(truth):
    model, rng = ChoiceModel(), np.random.default_rng(3)
    attract = np.linspace(0.9, 0.1, 10)
    outcomes = [model.simulate(attract, rng) for _ in range(4000)]
    for o in outcomes:
        assert np.all(o.purchased <= o.carted) and np.all(o.carted <= o.clicked) and np.all(o.clicked <= o.examined)
    clicks = np.mean([o.clicked.sum() for o in outcomes])
    assert clicks == pytest.approx(expected_clicks(model.examination(10), attract), rel=0.05)
    any_click = np.mean([o.clicked.any() for o in outcomes])
    assert any_click == pytest.approx(click_probability(model.examination(10), attract), rel=0.05)
    assert np.sum([o.carted.sum() for o in outcomes]) / np.sum([o.clicked.sum() for o in outcomes]) == pytest.approx(
        model.cart_rate, abs=0.03)


def _answer(ids: list[str]) -> dict:
    """A /rank answer as the service sends it."""
    return RankResponse(
        items=[{"item_id": i, "score": 1.0} for i in ids], model_version="v1", feature_age_ms=None, degraded=False,
        timings_ms={"features": 1.0, "score": 1.0, "rank": 1.0, "total": 3.0}, request_id="0a1b",
        experiment="exp", arm="control", scorer_batch_size=1,
    ).model_dump(mode="json")


def test_events_payload_of_an_outcome():
    f, t = False, True
    outcome = Outcome(
        examined=np.array([t, t, t, f]), clicked=np.array([t, f, t, f]),
        carted=np.array([t, f, f, f]), purchased=np.array([t, f, f, f]),
    )
    events = events_payload("u1", _answer(["a", "b", "c", "d"]), outcome, "run-0", 123.5, [10.0, 18.0, 32.4, 58.32])
    assert [(e["item_id"], e["position"], e["type"]) for e in events] == [
        ("a", 1, "click"), ("a", 1, "cart"), ("a", 1, "purchase"), ("c", 3, "click")]
    assert all(e["request_id"] == "0a1b" and e["user_id"] == "u1" and e["ts"] == 123.5 for e in events)
    assert [e.get("value") for e in events] == [None, None, 10.0, None]
    assert len({e["event_id"] for e in events}) == len(events)
    views = events_payload("u1", _answer(["a", "b", "c", "d"]), outcome, "run-0", 1.0, [1.0] * 4, post_views=True)
    assert [e["position"] for e in views if e["type"] == "view"] == [1, 2, 3]
    EventsRequest.model_validate({"events": views})


def test_react_funnel_events_are_consistent(truth):
    model, rng, user = ChoiceModel(b0=2.0), np.random.default_rng(4), _user(truth)
    candidates = draw_candidates(truth, user, 50, CandidateMix(), rng)
    stats = ArmStats()
    for r in range(200):
        shown = candidates[rng.permutation(50)[:10]]
        impression = react(truth, model, user, candidates, shown, rng)
        stats.add(impression)
        answer = _answer([truth.item_ids[i] for i in shown])
        events = events_payload(user.user_id, answer, impression.outcome, f"r{r}", 1.0, truth.price[shown].tolist())
        by_type = {kind: {(e["item_id"], e["position"]) for e in events if e["type"] == kind}
                   for kind in ("click", "cart", "purchase")}
        assert by_type["purchase"] <= by_type["cart"] <= by_type["click"]
        assert impression.revenue == pytest.approx(sum(e.get("value", 0.0) for e in events))
        assert np.all(np.diff(impression.ideal) <= 0)
    assert stats.clicks > 0 and stats.purchases > 0 and stats.ideal_expected_clicks >= stats.expected_clicks
    summary = stats.summary()
    assert summary["impressions"] == 200 and 0 < summary["ctr"] <= 1
    assert summary["expected_ctr"] == pytest.approx(summary["ctr"], abs=0.1)
    assert summary["revenue"] == pytest.approx(stats.revenue, abs=0.01)


def test_rank_body_is_a_valid_request(truth):
    user = _user(truth)
    candidates = draw_candidates(truth, user, 100, CandidateMix(), np.random.default_rng(5))
    body = rank_body(truth, user, candidates, 10)
    request = RankRequest.model_validate(body)
    assert request.k == 10 and len(request.candidates) == 100 and request.candidates[0].startswith("sku")


def test_retry_delay():
    request = httpx.Request("POST", "http://service/rank")
    busy = httpx.Response(503, headers={"Retry-After": "2"}, request=request)
    assert retry_delay(busy, 0) == 2.0 and retry_delay(busy, 2) == 2.0 and retry_delay(busy, 3) is None
    assert retry_delay(httpx.Response(503, headers={"Retry-After": "9999"}, request=request), 0) == 30.0
    assert retry_delay(httpx.Response(503, request=request), 0) is None
    assert retry_delay(httpx.Response(500, headers={"Retry-After": "1"}, request=request), 0) is None
    assert retry_delay(httpx.Response(422, request=request), 0) is None
    refused = httpx.ConnectError("refused", request=request)
    assert [retry_delay(refused, a) for a in range(4)] == [0.5, 1.0, 2.0, None]


def test_user_schedule_is_zipf_like():
    rng = np.random.default_rng(6)
    skewed = np.bincount(user_schedule(100, 20_000, 1.0, rng), minlength=100)
    flat = np.bincount(user_schedule(100, 20_000, 0.0, rng), minlength=100)
    assert skewed.max() > 10 * np.median(skewed) and flat.max() < 2 * np.median(flat)
    assert len(user_schedule(5, 0, 1.0, rng)) == 0


def test_cli_simulate_without_requests(data_dir, capsys):
    assert main(["simulate", "--url", "http://127.0.0.1:9", "--data", str(data_dir), "--requests", "0",
                 "--seed", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests"] == 0 and summary["arms"] == {} and summary["config"]["user_prefix"] is None
    assert "api_key" not in summary["config"]


def test_cli_errors(tmp_path, data_dir, capsys):
    assert main(["simulate", "--url", "http://x", "--data", str(tmp_path)]) == 2
    assert "synth_config.json" in capsys.readouterr().err
    assert main(["simulate", "--url", "x:8000", "--data", str(data_dir)]) == 2
    assert main(["simulate", "--url", "http://x", "--data", str(data_dir), "--users", "0"]) == 2


def test_a_changed_shop_has_new_successors_in_the_same_categories(tmp_path):
    from rerank.clients.simulate import ShopTruth
    from rerank.data.synth import SynthConfig, write_synth

    write_synth(tmp_path / "shop", SynthConfig(n_users=20, n_items=200, seed=2))
    truth = ShopTruth.from_dataset(tmp_path / "shop")
    changed = truth.with_new_successors(seed=5)
    assert changed.successors.shape == truth.successors.shape
    assert (changed.successors[1:] != truth.successors[1:]).any(axis=1).mean() > 0.9
    n_cat = truth.n_categories
    for i in range(1, truth.n_items + 1):
        cats = set(truth.category[changed.successors[i]])
        assert cats <= {truth.category[i], (truth.category[i] + 1) % n_cat}
        assert i not in changed.successors[i]
    assert (changed.with_new_successors(5).successors == truth.with_new_successors(5).successors).all()


def test_users_can_differ_in_how_much_they_click(tmp_path):
    from rerank.clients.simulate import ChoiceModel, ShopTruth, new_user
    from rerank.data.synth import SynthConfig, write_synth

    write_synth(tmp_path / "shop", SynthConfig(n_users=20, n_items=200, seed=2))
    truth = ShopTruth.from_dataset(tmp_path / "shop")
    rng = np.random.default_rng(0)
    alike = [new_user(truth, f"u{i}", rng).propensity for i in range(200)]
    assert set(alike) == {0.0}
    spread = np.array([new_user(truth, f"u{i}", rng, propensity_sd=1.0).propensity for i in range(2000)])
    assert 0.9 < spread.std() < 1.1 and abs(spread.mean()) < 0.1
    user = new_user(truth, "u", np.random.default_rng(1))
    items = np.arange(1, 51)
    low = ChoiceModel().attractiveness(truth, user, items)
    user.propensity = 1.0
    assert (ChoiceModel().attractiveness(truth, user, items) > low).all()


def test_ground_truth_series_by_window_of_requests(truth):
    """expected_ctr_by_window: per window of requests, the mean true P(click) of the lists shown."""
    model, rng, user = ChoiceModel(), np.random.default_rng(5), _user(truth)
    candidates = draw_candidates(truth, user, 50, CandidateMix(), rng)
    attract = model.attractiveness(truth, user, candidates)
    best, worst = candidates[np.argsort(-attract)[:10]], candidates[np.argsort(attract)[:10]]
    stats = ArmStats()
    for r in range(30):  # requests 0..29 with truth_every 10: good lists, then bad ones, then good
        shown = worst if 10 <= r < 20 else best
        stats.add(react(truth, model, user, candidates, shown, rng), window=r // 10)
    series = stats.summary()["expected_ctr_by_window"]
    good = click_probability(model.examination(10), model.attractiveness(truth, user, best))
    assert list(series) == ["0", "1", "2"]
    assert series["1"] < series["0"] and series["1"] < series["2"]
    assert series["0"] == pytest.approx(good, abs=0.05)  # the user's memory moves it a little

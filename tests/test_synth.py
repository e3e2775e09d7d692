"""The synthetic shop: determinism, funnel, long tail, drift, sessions and the planted pattern."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rerank.cli.main import main
from rerank.data.dataset import EVENT_CODE, leave_one_out, load_dataset
from rerank.data.synth import SynthConfig, generate_shop

SMALL = SynthConfig(n_users=500, n_items=300, seed=1)


@pytest.fixture(scope="module")
def shop():
    return generate_shop(SMALL)


def _columns(shop):
    ev = shop.events
    return ev["user_idx"].to_numpy(), ev["item_idx"].to_numpy(), ev["ts"].to_numpy()


def _sequences(shop) -> list[np.ndarray]:
    users, items, _ = _columns(shop)
    off = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=shop.config.n_users + 1))])
    return [items[off[u] : off[u + 1]] for u in range(1, shop.config.n_users + 1)]


def test_same_seed_same_shop_other_seed_other_shop(shop):
    again = generate_shop(SMALL)
    assert again.events.equals(shop.events) and again.items.equals(shop.items) and again.users.equals(shop.users)
    other = generate_shop(SynthConfig(n_users=500, n_items=300, seed=2))
    assert not other.events.equals(shop.events)


def test_users_have_distinct_items_in_time_order_and_enough_to_evaluate(shop):
    users, _, ts = _columns(shop)
    assert np.all(np.diff(users) >= 0)
    assert np.all(np.diff(ts)[np.diff(users) == 0] >= 0)
    for seq in _sequences(shop):
        assert len(seq) >= 3 and len(set(seq.tolist())) == len(seq)
    assert set(np.unique(users)) == set(range(1, SMALL.n_users + 1))


def test_funnel_counts_decrease_from_view_to_purchase(shop):
    types = shop.events["event_type"].to_pylist()
    counts = [types.count(t) for t in ("view", "click", "cart", "purchase")]
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0, counts


def test_popularity_is_long_tailed(shop):
    _, items, _ = _columns(shop)
    counts = np.sort(np.bincount(items, minlength=SMALL.n_items + 1)[1:])[::-1]
    top_tenth = counts[: SMALL.n_items // 10].sum() / counts.sum()
    assert top_tenth > 0.2  # uniform popularity would give 0.1
    # and the most popular items are the ones with the largest Zipf weight
    by_weight = np.argsort(-shop.item_weight[1:])[:10] + 1
    assert np.bincount(items, minlength=SMALL.n_items + 1)[by_weight].mean() > 3 * counts.mean()


def test_items_carry_category_brand_and_price_band(shop):
    attrs = shop.items["attributes"].to_pylist()
    n_cat = SMALL.categories
    assert all(len(a) == 3 for a in attrs)
    assert [a[0] for a in attrs] == list(shop.item_category[1:] + 1)
    brand_ids = {a[1] for a in attrs}
    band_ids = {a[2] for a in attrs}
    assert min(brand_ids) > n_cat and max(brand_ids) < min(band_ids)
    assert len(band_ids) == SMALL.n_price_bands


def test_sessions_have_short_gaps_inside_and_long_gaps_between(shop):
    users, _, ts = _columns(shop)
    same_user = users[1:] == users[:-1]
    same_session = shop.session[1:] == shop.session[:-1]
    gaps = np.diff(ts)
    inside, between = gaps[same_session], gaps[same_user & ~same_session]
    assert len(between) > SMALL.n_users  # users come back
    assert np.median(inside) < 300 and np.median(between) > 3600
    assert np.all(ts >= SMALL.start_ts)


def test_planted_successor_pattern_is_followed_inside_sessions(shop):
    _, items, _ = _columns(shop)
    same_session = shop.session[1:] == shop.session[:-1]
    follows = np.array([b in shop.successors[a] for a, b in zip(items[:-1], items[1:])])
    assert follows[same_session].mean() > 0.4
    assert follows[~same_session].mean() < 0.1  # it is a within-session pattern
    assert not np.any(shop.successors[1:] == np.arange(1, SMALL.n_items + 1)[:, None])


def test_next_item_is_predictable_from_the_last_item_but_not_from_popularity(shop):
    """A first-order transition count model beats popularity by far on the last item."""
    n = SMALL.n_items + 1
    seqs = _sequences(shop)
    transitions, popularity = np.zeros((n, n)), np.zeros(n)
    for seq in seqs:
        train = seq[:-1]
        np.add.at(popularity, train, 1)
        np.add.at(transitions, (train[:-1], train[1:]), 1)
    hits = {"popularity": 0, "transitions": 0}
    for seq in seqs:
        history, target = seq[:-1], seq[-1]
        for name, scores in (("popularity", popularity.copy()), ("transitions", transitions[history[-1]] + 1e-3 * popularity)):
            scores[history] = -1
            scores[0] = -1
            hits[name] += target in np.argsort(-scores)[:10]
    assert hits["transitions"] > 2 * hits["popularity"], hits


def test_interests_drift_over_time():
    """Category mix of a user's first half vs second half differs more with drift than without."""

    def mean_shift(cfg: SynthConfig) -> float:
        shop = generate_shop(cfg)
        shifts = []
        for seq in _sequences(shop):
            if len(seq) < 20:
                continue
            cats = shop.item_category[seq]
            half = len(cats) // 2
            a = np.bincount(cats[:half], minlength=cfg.categories) / half
            b = np.bincount(cats[half:], minlength=cfg.categories) / (len(cats) - half)
            shifts.append(0.5 * np.abs(a - b).sum())
        return float(np.mean(shifts))

    drifting = mean_shift(SMALL)
    steady = mean_shift(SynthConfig(n_users=500, n_items=300, seed=1, drift_probability=0.0))
    assert drifting > steady + 0.03, (drifting, steady)


def test_cli_writes_a_loadable_dataset(tmp_path, capsys):
    rc = main(["data", "synth", "--out", str(tmp_path / "shop"), "--users", "120", "--items", "90", "--seed", "5", "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    summary = json.loads(out)
    ds = load_dataset(tmp_path / "shop")
    assert summary["n_events"] == ds.meta["n_events"] and ds.n_users == 120 and ds.n_items == 90
    assert sum(summary["event_counts"].values()) == summary["n_events"]
    assert ds.has_timestamps and ds.meta["source_format"] == "synth"
    assert json.loads((tmp_path / "shop" / "synth_config.json").read_text())["seed"] == 5
    split = leave_one_out(ds)
    assert len(split.users) == 120
    assert set(np.concatenate(ds.event_type_sequences[1:]).tolist()) <= set(EVENT_CODE.values())
    shop = generate_shop(SynthConfig(n_users=120, n_items=90, seed=5))
    assert ds.events.equals(shop.events)  # the written stream is the generated one


def test_cli_refuses_a_too_small_catalogue(tmp_path, capsys):
    rc = main(["data", "synth", "--out", str(tmp_path / "shop"), "--items", "3"])
    _, err = capsys.readouterr()
    assert rc == 2 and "--items" in err and not (tmp_path / "shop").exists()

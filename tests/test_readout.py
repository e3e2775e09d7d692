"""The experiment readout: metrics and variances against hand-computed values, the always-valid
test, interleaving preference, an A/A simulation, Parquet loading, plots and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rerank.cli.main import main
from rerank.experiments.readout import (Look, chi2_sf, load_parquet, msprt_interval, msprt_p_value, plot_report, ratio_by_user,
                            report, sample_ratio, sequential_test)
from rerank.eventlog.records import EVENT_SCHEMA, IMPRESSION_SCHEMA, IMPRESSION_ITEM, events_table, impressions_table

DAY = "2024-01-01"


def imp(request_id, user, arm, ts, items, experiment="exp"):
    """items: item ids, or (item_id, team) pairs under interleaving."""
    items = [(i, "") if isinstance(i, str) else i for i in items]
    return {"stream_id": f"{int(ts * 1000)}-{request_id}", "request_id": request_id, "user_id": user,
            "experiment": experiment, "arm": arm, "model_version": "v1", "ts": float(ts),
            "items": [{"item_id": item, "position": p, "score": 0.0, "team": team}
                      for p, (item, team) in enumerate(items, start=1)], "day": DAY}


def ev(request_id, item, kind, ts, position=None, value=None, attributed="request_id"):
    return {"stream_id": f"{int(ts * 1000)}-{request_id}-{item}-{kind}", "event_id": f"e-{request_id}-{item}-{kind}",
            "user_id": "u", "item_id": item, "item_idx": 1, "type": kind, "ts": float(ts), "request_id": request_id,
            "position": position, "experiment": "exp", "arm": "", "team": "", "attributed": attributed,
            "value": value, "day": DAY}


@pytest.fixture
def ab_tables():
    """control: u1 (r1 clicked + bought 10.0, r2 only viewed), u2 (r3 carted, by window, no position);
    treat: u3 (r4 clicked + bought, no price), u4 (r5 nothing, r6 bought 5.0), u5 (r8 nothing)."""
    impressions = impressions_table([
        imp("r1", "u1", "control", 0, ["x", "y", "z"]), imp("r2", "u1", "control", 10, ["x", "y"]),
        imp("r3", "u2", "control", 20, ["y", "x"]), imp("r4", "u3", "treat", 5, ["x", "y", "z"]),
        imp("r5", "u4", "treat", 15, ["z"]), imp("r6", "u4", "treat", 25, ["x", "y"]),
        imp("r8", "u5", "treat", 30, ["x"]), imp("r7", "u1", "control", 3, ["x"], experiment="other"),
    ])
    events = events_table([
        ev("r1", "y", "click", 1, 2), ev("r1", "y", "purchase", 2, 2, value=10.0),
        ev("r2", "x", "view", 11, 1),
        ev("r3", "x", "cart", 21, attributed="window"),
        ev("r4", "x", "click", 6, 1, attributed=""), ev("r4", "z", "click", 6, 3), ev("r4", "z", "purchase", 7, 3),
        ev("r6", "y", "purchase", 26, 2, value=5.0),
        ev("r7", "x", "click", 4, 1), ev("r99", "x", "click", 4, 1),
    ])
    return impressions, events


def by_arm(result):
    return {arm["arm"]: arm for arm in result["arms"]}


# --- statistics --------------------------------------------------------------------------------


def test_ratio_by_user_is_the_clustered_delta_method():
    r = ratio_by_user([1, 1, 0], [1, 2, 1])  # r = 0.5; residuals 0.5, 0, -0.5
    assert r.mean == 0.5 and r.users == 3 and r.total == 4
    assert r.var == pytest.approx((0.25 + 0 + 0.25) / 16 * 3 / 2)
    one_each = ratio_by_user([1, 0, 1, 1], [1, 1, 1, 1])  # one impression per user: p(1-p)/(n-1)
    assert one_each.var == pytest.approx(0.75 * 0.25 / 3)
    assert math.isinf(ratio_by_user([1], [2]).var) and math.isnan(ratio_by_user([], []).mean)


def test_msprt_against_the_formula():
    diff, V, tau, alpha = 0.1, 0.001, 0.05, 0.05
    lam = math.sqrt(0.001 / 0.0035) * math.exp(0.0025 * 0.01 / (2 * 0.001 * 0.0035))
    assert lam == pytest.approx(19.0115, rel=1e-4)
    assert msprt_p_value(diff, V, tau) == pytest.approx(1 / lam)
    half = math.sqrt(0.001 * 0.0035 / 0.0025 * (math.log(0.0035 / 0.001) + 2 * math.log(20)))
    lo, hi = msprt_interval(diff, V, tau, alpha)
    assert (lo, hi) == pytest.approx((0.1 - half, 0.1 + half))
    assert msprt_p_value(0.001, V, tau) == 1.0  # Lambda < 1
    # the interval excludes 0 exactly when p < alpha
    for d in np.linspace(0, 0.2, 41):
        lo, _ = msprt_interval(d, V, tau, alpha)
        assert (lo > 0) == (msprt_p_value(d, V, tau) < alpha)


def test_msprt_without_information():
    assert msprt_p_value(0.1, 0.0, 0.05) == 1.0 and msprt_p_value(math.nan, 0.01, 0.05) == 1.0
    assert msprt_interval(0.1, math.inf, 0.05, 0.05) == (-math.inf, math.inf)
    with pytest.raises(ValueError):
        msprt_p_value(0.1, 0.01, 0.0)


def test_chi2_tail_against_tabulated_values():
    for x, dof, p in [(3.841459, 1, 0.05), (5.991465, 2, 0.05), (10.827566, 1, 0.001), (20.0, 10, 0.029253),
                      (0.5, 3, 0.918891)]:
        assert chi2_sf(x, dof) == pytest.approx(p, rel=1e-4)
    assert chi2_sf(0.0, 2) == 1.0 and chi2_sf(1e4, 1) == 0.0


def test_sample_ratio_mismatch():
    fine = sample_ratio({"a": 1000, "b": 1030}, {"a": 1, "b": 1})
    assert fine["checked"] and not fine["mismatch"] and fine["p"] > 0.4
    bad = sample_ratio({"a": 1000, "b": 1200}, {"a": 1, "b": 1})  # chi2 = 2 * 100**2 / 1100
    assert bad["mismatch"] and bad["chi2"] == pytest.approx(18.18, abs=0.01) and bad["p"] < 1e-4
    assert not sample_ratio({"a": 900, "b": 100}, {"a": 9, "b": 1})["mismatch"]  # weighted 90/10
    three = sample_ratio({"a": 500, "b": 500, "c": 1000}, {"a": 1, "b": 1, "c": 1})
    assert three["mismatch"] and three["expected_share"]["c"] == pytest.approx(1 / 3)
    assert not sample_ratio({"a": 5}, {"a": 1})["checked"]


def test_report_checks_the_sample_ratio_with_weights(ab_tables):
    assert "srm" not in report("exp", *ab_tables)
    srm = report("exp", *ab_tables, weights={"control": 1, "treat": 1})["srm"]
    assert srm["users"] == {"control": 2, "treat": 3} and not srm["mismatch"]


def test_sequential_test_takes_the_running_minimum_and_intersection():
    tau, alpha = 0.05, 0.05
    looks = [Look(1.0, 100, 0.02, 0.004), Look(2.0, 200, 0.12, 0.001), Look(3.0, 300, 0.03, 0.0005),
             Look(4.0, 400, 0.05, 0.0002)]
    p = [msprt_p_value(look.diff, look.var, tau) for look in looks]
    ci = [msprt_interval(look.diff, look.var, tau, alpha) for look in looks]
    assert p[1] < alpha <= p[2]  # look 2 significant, look 3 alone is not
    out = sequential_test(looks, tau, alpha)
    assert [row["p"] for row in out["looks"]] == pytest.approx([p[0], p[1], p[1], min(p[1], p[3])])
    for j, row in enumerate(out["looks"]):
        assert row["ci"] == pytest.approx([max(c[0] for c in ci[:j + 1]), min(c[1] for c in ci[:j + 1])])
    assert out["first_significant_impressions"] == 200 and out["significant"]
    assert out["diff"] == 0.05 and out["p"] == out["looks"][-1]["p"]
    assert sequential_test(looks[:1], tau, alpha)["first_significant_impressions"] is None


# --- A/B readout -------------------------------------------------------------------------------


def test_per_arm_metrics(ab_tables):
    result = report("exp", *ab_tables)
    assert result["type"] == "ab" and result["impressions"] == 7
    control, treat = by_arm(result)["control"], by_arm(result)["treat"]
    assert [a["arm"] for a in result["arms"]] == ["control", "treat"]  # order of first appearance
    assert (control["impressions"], control["users"], control["clicked_impressions"]) == (3, 2, 2)
    assert (treat["impressions"], treat["users"], treat["clicked_impressions"]) == (4, 3, 2)
    assert control["ctr"] == pytest.approx(2 / 3) and treat["ctr"] == 0.5
    assert (control["conversions"], treat["conversions"]) == (1, 2)
    assert control["conversion_rate"] == pytest.approx(1 / 3) and treat["conversion_rate"] == 0.5
    assert control["revenue"] == 10.0 and control["revenue_per_impression"] == pytest.approx(10 / 3)
    assert treat["revenue"] == 5.0 and treat["revenue_per_impression"] == 1.25  # r4's unknown price ignored
    assert control["ctr_by_position"][:4] == [0.0, pytest.approx(2 / 3), 0.0, None]
    assert treat["ctr_by_position"][:4] == [0.0, 0.5, 1.0, None]
    assert len(control["ctr_by_position"]) == 20
    # delta method by hand: control users (y, n) = (1, 2), (1, 1): r = 2/3, residuals -1/3, 1/3
    assert control["ctr_se"] ** 2 == pytest.approx((1 / 9 + 1 / 9) / 9 * 2 / 1)
    # treat users (1, 1), (1, 2), (0, 1): r = 1/2, residuals 1/2, 0, -1/2
    assert treat["ctr_se"] ** 2 == pytest.approx((1 / 4 + 0 + 1 / 4) / 16 * 3 / 2)
    json.dumps(result, allow_nan=False)


def test_comparison_against_the_formula(ab_tables):
    result = report("exp", *ab_tables, alpha=0.1)
    ctr = next(c for c in result["comparisons"] if c["metric"] == "ctr")
    assert (ctr["arm"], ctr["baseline"]) == ("treat", "control")
    diff, V = 0.5 - 2 / 3, 4 / 81 + 3 / 64
    tau = 0.1 * 4 / 7  # 10% of the pooled CTR (4 clicked of 7)
    assert ctr["tau"] == pytest.approx(tau) and ctr["diff"] == pytest.approx(diff)
    lam = math.sqrt(V / (V + tau**2)) * math.exp(tau**2 * diff**2 / (2 * V * (V + tau**2)))
    assert ctr["p"] == pytest.approx(min(1, 1 / lam))
    half = math.sqrt(V * (V + tau**2) / tau**2 * (math.log((V + tau**2) / V) + 2 * math.log(1 / 0.1)))
    assert ctr["ci"] == pytest.approx([diff - half, diff + half])
    assert len(ctr["looks"]) == 1 and ctr["first_significant_impressions"] is None
    explicit = report("exp", *ab_tables, tau=0.3)["comparisons"][0]
    assert explicit["tau"] == 0.3 and explicit["p"] == pytest.approx(msprt_p_value(diff, V, 0.3))


def test_looks_are_cumulative_and_monotone(ab_tables):
    result = report("exp", *ab_tables, look_every_s=10)
    ctr = next(c for c in result["comparisons"] if c["metric"] == "ctr")
    assert [(row["t"], row["impressions"]) for row in ctr["looks"]] == [(10.0, 3), (20.0, 5), (30.0, 7)]
    # at t=10: control r1 (clicked at 1), r2; treat r4 (clicked at 6): diff 1 - 1/2
    assert ctr["looks"][0]["diff"] == pytest.approx(0.5)
    ps = [row["p"] for row in ctr["looks"]]
    assert ps == sorted(ps, reverse=True)
    cis = [row["ci"] for row in ctr["looks"] if row["ci"][0] is not None]
    assert all(b[0] >= a[0] and b[1] <= a[1] for a, b in zip(cis, cis[1:]))
    over_time = by_arm(result)["treat"]["over_time"]
    assert [(row["t"], row["impressions"]) for row in over_time] == [(10.0, 1), (20.0, 1), (30.0, 2)]
    assert [row["ctr"] for row in over_time] == [1.0, 0.0, 0.5]


def test_arms_argument_and_unknown_experiment(ab_tables):
    result = report("exp", *ab_tables, arms=["treat", "control"])
    assert [a["arm"] for a in result["arms"]] == ["treat", "control"]
    assert result["comparisons"][0]["diff"] == pytest.approx(2 / 3 - 0.5)
    empty = report("nope", *ab_tables)
    assert empty["impressions"] == 0 and empty["arms"] == [] and empty["comparisons"] == []
    json.dumps(empty, allow_nan=False)


# --- interleaving ------------------------------------------------------------------------------


@pytest.fixture
def interleaved_tables():
    A, B = "A", "B"
    impressions = impressions_table([
        imp("i1", "u1", "interleaved", 0, [("x", A), ("y", B), ("z", A), ("w", B)]),
        imp("i2", "u2", "interleaved", 1, [("x", B), ("y", A)]),
        imp("i3", "u3", "interleaved", 2, [("x", A), ("y", B)]),
        imp("i4", "u4", "interleaved", 3, [("x", A), ("y", B)]),
        imp("i5", "u5", "interleaved", 4, [("x", A), ("y", B)]),
        imp("i6", "u1", "interleaved", 5, [("x", B), ("y", A), ("z", B)]),
        imp("i7", "u6", "interleaved", 6, [("x", A)]),
    ])
    events = events_table([
        ev("i1", "x", "click", 0.5, 1), ev("i1", "y", "click", 0.6, 2),  # tie
        ev("i2", "y", "click", 1.5, 2),  # A
        ev("i3", "y", "click", 3, 2), ev("i3", "y", "purchase", 3.5, 2),  # B, once
        ev("i4", "x", "click", 3.5, 1), ev("i4", "x", "cart", 3.6),  # A (position from the items)
        ev("i6", "x", "click", 6, 1), ev("i6", "y", "click", 7, 2), ev("i6", "z", "click", 8, 3),  # B 2-1
        ev("i7", "x", "click", 9, 1),  # A
    ])
    return impressions, events


def test_interleaving_preference(interleaved_tables):
    result = report("exp", *interleaved_tables)
    assert result["type"] == "interleave"
    inter = result["interleaving"]
    assert inter["teams"] == ["A", "B"] and inter["wins"] == {"A": 3, "B": 2} and inter["ties"] == 1
    assert inter["share"] == pytest.approx(0.6) and inter["diff"] == pytest.approx(0.1)
    V = 0.6 * 0.4 / 4  # one decided impression per user: p(1-p)/(n-1)
    assert inter["se"] ** 2 == pytest.approx(V)
    assert inter["tau"] == 0.05 and inter["p"] == pytest.approx(msprt_p_value(0.1, V, 0.05))
    lo, hi = msprt_interval(0.1, V, 0.05, 0.05)
    assert inter["share_ci"] == pytest.approx([lo + 0.5, hi + 0.5])
    assert by_arm(result)["interleaved"]["impressions"] == 7
    json.dumps(result, allow_nan=False)


def test_interleaving_winner_follows_the_clicks_over_looks(interleaved_tables):
    inter = report("exp", *interleaved_tables, look_every_s=7)["interleaving"]
    first, last = inter["looks"]
    assert first["t"] == 7.0 and first["impressions"] == 7
    assert first["wins"] == {"A": 2, "B": 1} and first["ties"] == 2  # i6 is 1-1 at t=7, i7 not yet clicked
    assert last["wins"] == {"A": 3, "B": 2} and last["ties"] == 1
    swapped = report("exp", *interleaved_tables, arms=["B", "A"])["interleaving"]
    assert swapped["wins"] == {"B": 2, "A": 3} and swapped["share"] == pytest.approx(0.4)


# --- A/A simulation ------------------------------------------------------------------------------


def simulated_tables(rng: np.random.Generator, lift: float, users: int = 400, hours: int = 24):
    """~2000 impressions of `users` users (one arm each), a per-user CTR ~ Beta(2, 18) times
    (1 + lift) in the treatment, spread over `hours`."""
    arm = rng.integers(0, 2, users)
    ctr = rng.beta(2, 18, users) * np.where(arm == 1, 1 + lift, 1.0)
    per_user = rng.poisson(5, users) + 1
    user = np.repeat(np.arange(users), per_user)
    n = len(user)
    ts = np.sort(rng.uniform(0, hours * 3600, n))
    clicked = rng.random(n) < ctr[user]
    request_ids = pa.array([f"r{j}" for j in range(n)])
    items = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.StructArray.from_arrays(
        [pa.array(["x"] * n), pa.array(np.ones(n, np.int32)), pa.array(np.zeros(n)), pa.array([""] * n)],
        fields=list(IMPRESSION_ITEM)))
    impressions = pa.Table.from_arrays([
        request_ids, request_ids, pa.array([f"u{u}" for u in user]), pa.array(["aa"] * n),
        pa.array(np.array(["control", "treat"])[arm[user]]), pa.array(["v"] * n), pa.array(ts), items,
        pa.array(np.ones(n, np.int32)), pa.array([DAY] * n)], schema=IMPRESSION_SCHEMA)
    c = int(clicked.sum())
    events = pa.Table.from_arrays([
        pa.array([f"e{j}" for j in range(c)]), pa.array(["e"] * c), pa.array(["u"] * c), pa.array(["x"] * c),
        pa.array(np.ones(c, np.int32)), pa.array(["click"] * c), pa.array(ts[clicked] + 30),
        request_ids.filter(pa.array(clicked)), pa.array(np.ones(c, np.int32)), pa.array(["aa"] * c),
        pa.array([""] * c), pa.array([""] * c), pa.array(["request_id"] * c), pa.nulls(c, pa.float64()),
        pa.array([DAY] * c)], schema=EVENT_SCHEMA)
    return impressions, events


def test_aa_false_positive_rate_and_power():
    rng = np.random.default_rng(2024)
    aa = [report("aa", *simulated_tables(rng, 0.0))["comparisons"][0] for _ in range(200)]
    assert all(c["metric"] == "ctr" and len(c["looks"]) in (24, 25) for c in aa)  # hourly
    false_positives = sum(c["p"] < 0.05 for c in aa)
    assert false_positives <= 16  # 8% of 200; always-valid tests sit well under 5%
    effect = [report("aa", *simulated_tables(rng, 1.0), arms=["control", "treat"])["comparisons"][0]
              for _ in range(10)]
    assert sum(c["p"] < 0.05 for c in effect) >= 9
    assert all(c["ci"][0] > 0 for c in effect if c["p"] < 0.05)


# --- Parquet, plots, CLI -------------------------------------------------------------------------


def write_sink(root, impressions, events):
    for name, table in (("impressions", impressions), ("events", events)):
        first, rest = table.slice(0, 3), table.slice(3)
        for day, part in ((DAY, first), ("2024-01-02", rest)):
            directory = root / name / f"day={day}"
            directory.mkdir(parents=True, exist_ok=True)
            pq.write_table(part.drop(["day"]), directory / "a.parquet")
        pq.write_table(first.drop(["day"]), root / name / f"day={DAY}" / "rewrite.parquet")  # duplicates


def test_load_parquet_round_trip(tmp_path, ab_tables):
    impressions, events = ab_tables
    write_sink(tmp_path, impressions, events)
    loaded_imps, loaded_events = load_parquet(tmp_path)
    assert loaded_imps.schema == IMPRESSION_SCHEMA and loaded_events.schema == EVENT_SCHEMA
    assert loaded_imps.num_rows == impressions.num_rows and loaded_events.num_rows == events.num_rows
    key = "stream_id"
    assert sorted(loaded_imps[key].to_pylist()) == sorted(impressions[key].to_pylist())
    days = dict(zip(loaded_imps[key].to_pylist(), loaded_imps["day"].to_pylist()))
    assert days[impressions[key][0].as_py()] == DAY and days[impressions[key][5].as_py()] == "2024-01-02"
    assert report("exp", loaded_imps, loaded_events)["arms"] == report("exp", impressions, events)["arms"]
    empty_imps, empty_events = load_parquet(tmp_path / "missing")
    assert empty_imps.num_rows == 0 and empty_imps.schema == IMPRESSION_SCHEMA
    assert empty_events.num_rows == 0 and empty_events.schema == EVENT_SCHEMA


def test_load_parquet_reads_files_from_before_n_items(tmp_path, ab_tables):
    """Files the sink wrote before impressions carried `n_items` (truncation) read it as null."""
    impressions, events = ab_tables
    write_sink(tmp_path, impressions.drop(["n_items"]), events)
    loaded, _ = load_parquet(tmp_path)
    assert loaded.schema == IMPRESSION_SCHEMA and loaded["n_items"].null_count == loaded.num_rows
    assert report("exp", loaded, events)["arms"] == report("exp", impressions, events)["arms"]


def test_plot_report_writes_pngs(tmp_path, ab_tables, interleaved_tables):
    paths = plot_report(report("exp", *ab_tables, look_every_s=10), tmp_path / "ab")
    paths += plot_report(report("exp", *interleaved_tables), tmp_path / "il")
    assert len(paths) == 5
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_report(tmp_path, ab_tables, capsys):
    write_sink(tmp_path, *ab_tables)
    assert main(["experiment", "report", "exp", "--data", str(tmp_path), "--json", "--plots",
                 str(tmp_path / "plots")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert by_arm(result)["treat"]["ctr"] == 0.5 and len(result["plots"]) == 2
    assert main(["experiment", "report", "exp", "--data", str(tmp_path), "--tau", "0.2"]) == 0
    text = capsys.readouterr().out
    assert "treat vs control ctr" in text and "control" in text
    assert main(["experiment", "report", "nope", "--data", str(tmp_path)]) == 2
    assert "no impressions" in capsys.readouterr().err
    assert main(["experiment", "report", "exp", "--data", str(tmp_path), "--weights", "control=1,treat=1"]) == 0
    assert "sample ratio: users control 2, treat 3" in capsys.readouterr().out
    assert main(["experiment", "report", "exp", "--data", str(tmp_path), "--weights", "control=x"]) == 2
    assert "--weights" in capsys.readouterr().err


def test_a_click_stamped_far_in_the_future_does_not_multiply_the_looks(ab_tables):
    """A client clock far ahead (ts = 2e9) counts at the horizon: the looks stay a handful."""
    impressions, events = ab_tables
    far = events_table([ev("r5", "z", "click", 2e9, 1)])
    result = report("exp", impressions, pa.concat_tables([events, far]), look_every_s=10, max_click_delay_s=100)
    ctr = next(c for c in result["comparisons"] if c["metric"] == "ctr")
    assert len(ctr["looks"]) <= 15 and result["end"] <= 30 + 100

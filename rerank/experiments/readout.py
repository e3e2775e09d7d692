"""Experiment readout: per-arm metrics, always-valid comparisons and interleaving preference, from
the impressions and events tables (rerank.eventlog.records schemas; docs/EXPERIMENTS.md).

A click is an attributed (by request_id or window) click, cart or purchase; an impression is
clicked when it has at least one, converted when it has an attributed purchase. The unit of
analysis is the user (assignment is per user): ratio metrics are sum over users of y_u / sum of
n_u, with the delta-method variance clustered by user,

    var(r) = U/(U-1) * sum_u (y_u - r n_u)^2 / (sum_u n_u)^2        (U users)

where U/(U-1) is the usual small-sample correction of a cluster-robust variance (with one
impression per user it gives p(1-p)/(n-1)).

Comparisons (each arm against the first) use the mixture SPRT of Johari, Pekelis and Walsh (2017,
"Always valid inference"), a normal mixture N(0, tau^2) over the true difference d:

    Lambda = sqrt(V/(V+tau^2)) exp(tau^2 d^2 / (2 V (V+tau^2))),   p = min(1, 1/Lambda)
    CI = d +- sqrt(V (V+tau^2)/tau^2 (log((V+tau^2)/V) + 2 log(1/alpha)))

valid however often one looks. The test is evaluated at every look (cumulative data up to
start + j * look_every_s, and at the end); the reported p is the running minimum and the interval
the running intersection, so "when did it become significant" has an answer.

tau, the scale of effects the test expects, defaults to RELATIVE_TAU (10%) of the metric's pooled
level at the end of the experiment: the pooled CTR or conversion rate of the two arms, 0.5 for an
interleaving share. The mSPRT is most sensitive to effects near tau, and ranking changes move CTR
and conversion by relative amounts (a few to tens of percent), so one relative scale suits a 10%
CTR and a 0.5% conversion rate alike where one absolute number could not. The same tau holds at
every look; `tau=` overrides it with one absolute value for every comparison.

Interleaving (arm "interleaved", items carry teams): an impression with clicks is won by the team
with more credited clicks (rerank.experiments.interleaving), ties are counted and left out; the preference
share of the first team is wins_A / (wins_A + wins_B), tested against 0.5 with the same always-valid
test, its variance clustered by user like the ratios above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rerank.experiments.book import INTERLEAVED_ARM
from rerank.experiments.interleaving import credit, winner
from rerank.eventlog.records import EVENT_SCHEMA, IMPRESSION_SCHEMA, explode_impressions

ATTRIBUTED = ("request_id", "window")
CLICK_TYPES = ("click", "cart", "purchase")
RELATIVE_TAU = 0.1
SRM_ALPHA = 0.001  # a sample ratio mismatch is flagged below this p (the usual, strict, threshold)
METRICS = ("ctr", "conversion_rate")


# --- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    """sum(y) / sum(n) over users, with its user-clustered delta-method variance."""

    mean: float  # nan when sum(n) == 0
    var: float  # inf with fewer than two users (no information), nan when sum(n) == 0
    users: int
    total: float  # sum(n)


def ratio_by_user(y: Sequence[float], n: Sequence[float]) -> Ratio:
    """Ratio metric from per-user sums y_u (e.g. clicked impressions) and n_u (impressions)."""
    y, n = np.asarray(y, dtype=float), np.asarray(n, dtype=float)
    total, users = float(n.sum()), len(n)
    if total == 0:
        return Ratio(math.nan, math.nan, users, total)
    mean = float(y.sum()) / total
    if users < 2:
        return Ratio(mean, math.inf, users, total)
    var = float(((y - mean * n) ** 2).sum()) / total**2 * users / (users - 1)
    return Ratio(mean, var, users, total)


def _informative(diff: float, var: float) -> bool:
    return math.isfinite(diff) and math.isfinite(var) and var > 0


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")


def msprt_p_value(diff: float, var: float, tau: float) -> float:
    """Always-valid p-value of the mSPRT for an observed difference with variance var; 1 without
    information (var zero, infinite or nan)."""
    if not _informative(diff, var):
        return 1.0
    _check_tau(tau)
    t2 = tau * tau
    log_lambda = 0.5 * math.log(var / (var + t2)) + t2 * diff * diff / (2 * var * (var + t2))
    return math.exp(-log_lambda) if log_lambda > 0 else 1.0


def msprt_interval(diff: float, var: float, tau: float, alpha: float) -> tuple[float, float]:
    """Always-valid (1 - alpha) interval for the difference; (-inf, inf) without information."""
    if not _informative(diff, var):
        return -math.inf, math.inf
    _check_tau(tau)
    t2 = tau * tau
    half = math.sqrt(var * (var + t2) / t2 * (math.log((var + t2) / var) + 2 * math.log(1 / alpha)))
    return diff - half, diff + half


def default_tau(level: float) -> float:
    """The mixture scale for a metric whose pooled level is `level` (see the module docstring)."""
    return RELATIVE_TAU * abs(level) if math.isfinite(level) else 0.0


@dataclass(frozen=True)
class Look:
    """The cumulative comparison at one look."""

    t: float
    impressions: int  # of both arms, served up to t
    diff: float
    var: float


def sequential_test(looks: Sequence[Look], tau: float, alpha: float) -> dict:
    """Always-valid p (running minimum) and interval (running intersection) over the looks, the
    impressions at the first look with p < alpha, and every look's running values."""
    p, lo, hi = 1.0, -math.inf, math.inf
    first_significant = None
    rows = []
    for look in looks:
        p = min(p, msprt_p_value(look.diff, look.var, tau))
        look_lo, look_hi = msprt_interval(look.diff, look.var, tau, alpha)
        lo, hi = max(lo, look_lo), min(hi, look_hi)
        if first_significant is None and p < alpha:
            first_significant = look.impressions
        rows.append({"t": look.t, "impressions": look.impressions, "diff": _num(look.diff),
                     "ci": [_num(lo), _num(hi)], "p": p})
    last = looks[-1] if looks else Look(math.nan, 0, math.nan, math.nan)
    return {"diff": _num(last.diff), "se": _se(last.var),
            "ci": [_num(lo), _num(hi)], "p": p, "significant": p < alpha,
            "first_significant_impressions": first_significant, "looks": rows}


def _num(x: float) -> float | None:
    """JSON-safe number: None for nan and infinities."""
    return float(x) if x is not None and math.isfinite(x) else None


def _se(var: float) -> float | None:
    return _num(math.sqrt(var)) if var >= 0 else None


# --- data ------------------------------------------------------------------------------------


@dataclass
class _Data:
    """One experiment's impressions (sorted by time) as arrays, with their attributed clicks."""

    items: pa.ChunkedArray  # (N,) the shown items (IMPRESSION_ITEM lists)
    ts: np.ndarray  # (N,) answer time
    user: np.ndarray  # (N,) user index
    n_users: int
    arm: np.ndarray  # (N,) index into the arm names
    first_click: np.ndarray  # (N,) time of the first click/cart/purchase, inf = none
    first_purchase: np.ndarray  # (N,) inf = none
    revenue: np.ndarray  # (N,) sum of known purchase values
    has_value: np.ndarray  # (N,) bool: some purchase value is known
    click_imp: np.ndarray  # (C,) impression index of each click event
    click_ts: np.ndarray  # (C,)
    click_position: np.ndarray  # (C,) 1-based, 0 = unknown
    shown_imp: np.ndarray  # (S,) impression index of each shown item
    shown_position: np.ndarray  # (S,)


def _as_index(values: pa.ChunkedArray | pa.Array, value_set: pa.Array) -> np.ndarray:
    """Position of each value in value_set, -1 when absent or null."""
    found = pc.index_in(values, value_set=value_set)
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _clicks(impressions: pa.Table, events: pa.Table, exploded: pa.Table) -> pa.Table:
    """Attributed click/cart/purchase events of these impressions, with `imp` (their index) and
    `position` filled from the shown items where the client sent none."""
    keep = pc.and_(pc.is_in(events["attributed"], value_set=pa.array(ATTRIBUTED)),
                   pc.is_in(events["type"], value_set=pa.array(CLICK_TYPES)))
    ev = events.filter(pc.fill_null(keep, False))
    imp = _as_index(ev["request_id"], impressions["request_id"].combine_chunks())
    ev = ev.append_column("imp", pa.array(imp)).filter(pa.array(imp >= 0))
    shown_keys = pc.binary_join_element_wise(exploded["request_id"], exploded["item_id"], "\x1f")
    event_keys = pc.binary_join_element_wise(ev["request_id"], ev["item_id"], "\x1f")
    shown_at = _as_index(event_keys, shown_keys.combine_chunks())
    from_items = np.append(exploded["position"].to_numpy(zero_copy_only=False), 0)[shown_at]  # -1 -> 0
    sent = pc.fill_null(ev["position"], 0).to_numpy(zero_copy_only=False)
    return ev.append_column("resolved_position", pa.array(np.where(sent > 0, sent, from_items).astype(np.int64)))


def _prepare(impressions: pa.Table, events: pa.Table, names: list[str],
             max_click_delay_s: float = math.inf) -> _Data:
    """The arrays of _Data; `names` are the arms to report, in order. A click stamped more than
    max_click_delay_s after the last impression (a client clock far ahead) counts at that horizon."""
    n = impressions.num_rows
    exploded = explode_impressions(impressions)
    clicks = _clicks(impressions, events, exploded)
    imp = clicks["imp"].to_numpy()
    horizon = float(pc.max(impressions["ts"]).as_py()) + max_click_delay_s if n else math.inf
    ts = np.minimum(clicks["ts"].to_numpy(zero_copy_only=False), horizon)
    purchase = pc.equal(clicks["type"], "purchase").to_numpy(zero_copy_only=False)
    value = pc.fill_null(clicks["value"], math.nan).to_numpy(zero_copy_only=False)
    first_click, first_purchase = np.full(n, math.inf), np.full(n, math.inf)
    np.minimum.at(first_click, imp, ts)
    np.minimum.at(first_purchase, imp[purchase], ts[purchase])
    known = purchase & ~np.isnan(value)
    revenue, has_value = np.zeros(n), np.zeros(n, dtype=bool)
    np.add.at(revenue, imp[known], value[known])
    has_value[imp[known]] = True
    user_ids, user = np.unique(impressions["user_id"].to_numpy(zero_copy_only=False), return_inverse=True)
    return _Data(items=impressions["items"], ts=impressions["ts"].to_numpy(zero_copy_only=False),
                 user=user.ravel(), n_users=len(user_ids),
                 arm=_as_index(impressions["arm"], pa.array(names, pa.string())), first_click=first_click,
                 first_purchase=first_purchase, revenue=revenue, has_value=has_value, click_imp=imp,
                 click_ts=ts, click_position=clicks["resolved_position"].to_numpy(),
                 shown_imp=_as_index(exploded["request_id"], impressions["request_id"].combine_chunks()),
                 shown_position=exploded["position"].to_numpy(zero_copy_only=False))


def _first_appearance(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def _look_times(start: float, end: float, every: float) -> np.ndarray:
    """start + j * every strictly before end, then end itself."""
    if not every > 0:
        raise ValueError(f"look_every_s must be positive, got {every}")
    intervals = math.ceil((end - start) / every)
    return np.append(start + every * np.arange(1, intervals), end)


def _user_ratio(data: _Data, numerator: np.ndarray, mask: np.ndarray) -> Ratio:
    users = data.user[mask]
    n = np.bincount(users, minlength=data.n_users)
    y = np.bincount(users, weights=numerator[mask].astype(float), minlength=data.n_users)
    present = n > 0
    return ratio_by_user(y[present], n[present])


# --- A/B ---------------------------------------------------------------------------------------


def _metric_flags(data: _Data, t: float = math.inf) -> dict[str, np.ndarray]:
    """Per impression, for each metric: did it happen by time t (ever, by default)?"""
    if t == math.inf:
        return {"ctr": np.isfinite(data.first_click), "conversion_rate": np.isfinite(data.first_purchase)}
    return {"ctr": data.first_click <= t, "conversion_rate": data.first_purchase <= t}


def _ctr_by_position(data: _Data, arm: int, max_position: int) -> list[float | None]:
    """Impressions clicked at position p / impressions that showed position p, p = 1..max_position."""
    stride = max_position + 1
    in_arm = (data.arm[data.shown_imp] == arm) & (data.shown_position <= max_position)
    shown_pairs = data.shown_imp[in_arm] * stride + data.shown_position[in_arm]
    shown = np.bincount(shown_pairs % stride, minlength=stride)[1:]
    clicked_pairs = np.unique(data.click_imp * stride + data.click_position)
    pairs = clicked_pairs[np.isin(clicked_pairs, shown_pairs)]  # positions the impression showed
    clicked = np.bincount(pairs % stride, minlength=stride)[1:]
    return [_num(c / s) if s else None for c, s in zip(clicked, shown)]


def _over_time(data: _Data, arm: int, look_times: np.ndarray) -> list[dict]:
    """Per look bucket (start of the previous look, this look]: the impressions served and their CTR
    (clicks whenever they came), with a plain (not always-valid) standard error."""
    bucket = np.searchsorted(look_times, data.ts, side="left")
    clicked = _metric_flags(data)["ctr"]
    rows = []
    for j, t in enumerate(look_times):
        ratio = _user_ratio(data, clicked, (data.arm == arm) & (bucket == j))
        rows.append({"t": float(t), "impressions": int(ratio.total), "ctr": _num(ratio.mean),
                     "ctr_se": _se(ratio.var)})
    return rows


def _arm_summary(data: _Data, arm: int, name: str, look_times: np.ndarray, max_position: int) -> dict:
    mask = data.arm == arm
    flags = _metric_flags(data)
    ctr = _user_ratio(data, flags["ctr"], mask)
    conversion = _user_ratio(data, flags["conversion_rate"], mask)
    impressions = int(mask.sum())
    revenue = float(data.revenue[mask].sum()) if data.has_value[mask].any() else None
    return {"arm": name, "impressions": impressions, "users": int(len(np.unique(data.user[mask]))),
            "clicked_impressions": int(flags["ctr"][mask].sum()), "ctr": _num(ctr.mean), "ctr_se": _se(ctr.var),
            "conversions": int(flags["conversion_rate"][mask].sum()), "conversion_rate": _num(conversion.mean),
            "conversion_rate_se": _se(conversion.var), "revenue": revenue,
            "revenue_per_impression": revenue / impressions if revenue is not None and impressions else None,
            "ctr_by_position": _ctr_by_position(data, arm, max_position),
            "over_time": _over_time(data, arm, look_times)}


def _comparisons(data: _Data, names: list[str], look_times: np.ndarray, alpha: float,
                 tau: float | None) -> list[dict]:
    per_look = []  # per_look[j][metric][arm] = Ratio
    for t in look_times:
        served = data.ts <= t
        flags = _metric_flags(data, t)
        per_look.append({metric: [_user_ratio(data, flags[metric], served & (data.arm == arm))
                                  for arm in range(len(names))] for metric in METRICS})
    final = _metric_flags(data)
    out = []
    for arm in range(1, len(names)):
        for metric in METRICS:
            pair = (data.arm == 0) | (data.arm == arm)
            level = float(final[metric][pair].mean()) if pair.any() else math.nan
            metric_tau = tau if tau is not None else default_tau(level)
            looks = [Look(float(t), int(ratios[metric][0].total + ratios[metric][arm].total),
                          ratios[metric][arm].mean - ratios[metric][0].mean,
                          ratios[metric][0].var + ratios[metric][arm].var)
                     for t, ratios in zip(look_times, per_look)]
            out.append({"arm": names[arm], "baseline": names[0], "metric": metric, "tau": metric_tau,
                        **sequential_test(looks, metric_tau, alpha)})
    return out


# --- interleaving ------------------------------------------------------------------------------


def _win_timeline(data: _Data, teams: tuple[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each impression with clicks, its winner after each click: (impression, from, until,
    code) with code 0/1 = that team leads, 2 = tie; `until` is the next click's time (inf = last)."""
    order = np.lexsort((data.click_ts, data.click_imp))
    imp, ts, position = data.click_imp[order], data.click_ts[order], data.click_position[order]
    clicked = np.unique(imp)
    items = data.items.take(pa.array(clicked)).to_pylist()
    item_teams = {int(i): [item["team"] for item in shown] for i, shown in zip(clicked, items)}
    code = np.empty(len(imp), dtype=np.int64)
    start = 0
    for k in range(len(imp)):
        if k > 0 and imp[k] != imp[k - 1]:
            start = k
        leader = winner(credit(item_teams[int(imp[k])], position[start:k + 1].tolist()), teams)
        code[k] = 2 if leader is None else teams.index(leader)
    until = np.full(len(imp), math.inf)
    same_next = imp[1:] == imp[:-1]
    until[:-1][same_next] = ts[1:][same_next]
    return imp, ts, until, code


def _interleaving(data: _Data, teams: tuple[str, str], look_times: np.ndarray, alpha: float,
                  tau: float | None) -> dict:
    imp, since, until, code = _win_timeline(data, teams)
    looks, counts = [], []
    for t in look_times:
        current = (since <= t) & (until > t) & (data.ts[imp] <= t)
        decided = current & (code < 2)
        users = data.user[imp[decided]]
        n = np.bincount(users, minlength=data.n_users)
        y = np.bincount(users, weights=(code[decided] == 0).astype(float), minlength=data.n_users)
        share = ratio_by_user(y[n > 0], n[n > 0])
        looks.append(Look(float(t), int((data.ts <= t).sum()), share.mean - 0.5, share.var))
        counts.append([int((current & (code == c)).sum()) for c in (0, 1, 2)])
    metric_tau = tau if tau is not None else default_tau(0.5)
    test = sequential_test(looks, metric_tau, alpha)
    for row, (wins_a, wins_b, ties) in zip(test["looks"], counts):
        row.update(wins={teams[0]: wins_a, teams[1]: wins_b}, ties=ties)
    wins_a, wins_b, ties = counts[-1]
    return {"teams": list(teams), "wins": {teams[0]: wins_a, teams[1]: wins_b}, "ties": ties,
            "share": wins_a / (wins_a + wins_b) if wins_a + wins_b else None,
            "share_ci": [None if x is None else x + 0.5 for x in test["ci"]], "tau": metric_tau, **test}


# --- the report --------------------------------------------------------------------------------


def _is_interleaved(impressions: pa.Table) -> bool:
    arms = set(impressions["arm"].to_pylist())
    return arms == {INTERLEAVED_ARM} and bool(_first_appearance(explode_impressions(impressions)["team"].to_pylist()))


# --- sample ratio mismatch ---------------------------------------------------------------------


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X ~ chi-square(dof): the regularized upper incomplete gamma Q(dof/2, x/2),
    by its series below a + 1 and its continued fraction above (Numerical Recipes, 6.2)."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    if x <= 0:
        return 1.0
    a, z = dof / 2.0, x / 2.0
    log_front = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1.0:  # P(a, z) by its series; Q = 1 - P
        term = total = 1.0 / a
        n = a
        while abs(term) > abs(total) * 1e-15:
            n += 1.0
            term *= z / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_front))
    b, c, d = z + 1.0 - a, 1.0 / 1e-300, 1.0 / (z + 1.0 - a)  # Lentz's continued fraction for Q
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)


def sample_ratio(users: Mapping[str, int], weights: Mapping[str, float], alpha: float = SRM_ALPHA) -> dict:
    """Sample ratio mismatch check: do the users per arm match the arms' weights? Chi-square
    goodness of fit over the arms in `weights` (users are the assignment unit). A mismatch means
    the assignment or the logging lost or added users unevenly, and no comparison of the arms can
    be trusted. Weights changed during the experiment (a ramp) also show as a mismatch."""
    arms = [arm for arm, w in weights.items() if w > 0]
    total_w = sum(weights[arm] for arm in arms)
    n = sum(users.get(arm, 0) for arm in arms)
    if len(arms) < 2 or n == 0:
        return {"checked": False, "reason": "needs two arms with weight and some users"}
    expected = {arm: n * weights[arm] / total_w for arm in arms}
    chi2 = sum((users.get(arm, 0) - e) ** 2 / e for arm, e in expected.items())
    p = chi2_sf(chi2, len(arms) - 1)
    return {"checked": True, "users": {arm: int(users.get(arm, 0)) for arm in arms},
            "expected_share": {arm: weights[arm] / total_w for arm in arms}, "chi2": chi2, "p": p,
            "alpha": alpha, "mismatch": p < alpha}


def report(name: str, impressions: pa.Table, events: pa.Table, *, arms: Sequence[str] | None = None,
           alpha: float = 0.05, tau: float | None = None, look_every_s: float = 3600.0,
           max_position: int = 20, weights: Mapping[str, float] | None = None,
           max_click_delay_s: float = 86_400.0) -> dict:
    """The readout of experiment `name` (JSON-serialisable). arms: the arms (A/B) or teams
    (interleaving) to report, the first being the baseline; default: order of first appearance.
    weights: the A/B arms' configured weights, for the sample ratio check (`srm`; absent without)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if tau is not None:
        _check_tau(tau)
    imps = impressions.filter(pc.equal(impressions["experiment"], name)).sort_by("ts")
    kind = "interleave" if imps.num_rows and _is_interleaved(imps) else "ab"
    if kind == "interleave":
        teams = list(arms) if arms else _first_appearance(explode_impressions(imps)["team"].to_pylist())
        if len(teams) != 2:
            raise ValueError(f"interleaving experiment {name!r} needs exactly two teams, found {teams}")
        names = [INTERLEAVED_ARM]
    else:
        names = list(arms) if arms else _first_appearance(imps["arm"].to_pylist())
        imps = imps.filter(pc.is_in(imps["arm"], value_set=pa.array(names, pa.string())))
    out = {"experiment": name, "type": kind, "alpha": alpha, "look_every_s": look_every_s,
           "impressions": imps.num_rows}
    if not imps.num_rows:
        return {**out, "start": None, "end": None, "arms": [], "comparisons": []}
    data = _prepare(imps, events, names, max_click_delay_s)
    end = max(float(data.ts.max()), float(data.click_ts.max()) if len(data.click_ts) else -math.inf)
    look_times = _look_times(float(data.ts.min()), end, look_every_s)
    out.update(start=float(data.ts.min()), end=end,
               arms=[_arm_summary(data, i, arm, look_times, max_position) for i, arm in enumerate(names)])
    if kind == "interleave":
        out.update(comparisons=[], interleaving=_interleaving(data, (teams[0], teams[1]), look_times, alpha, tau))
    else:
        out.update(comparisons=_comparisons(data, names, look_times, alpha, tau))
        if weights:
            out["srm"] = sample_ratio({a["arm"]: a["users"] for a in out["arms"]}, weights)
    return out


# --- Parquet and plots ---------------------------------------------------------------------------


def _read_dataset(path: Path, schema: pa.Schema, experiment: str | None = None) -> pa.Table:
    import pyarrow.dataset as ds

    if not path.is_dir():
        return schema.empty_table()
    partitioning = ds.partitioning(pa.schema([("day", pa.string())]), flavor="hive")
    where = ds.field("experiment") == experiment if experiment is not None else None
    table = ds.dataset(path, schema=schema, format="parquet", partitioning=partitioning).to_table(filter=where)
    first_rows = table.append_column("_row", pa.array(np.arange(table.num_rows))) \
        .group_by("stream_id", use_threads=False).aggregate([("_row", "min")])["_row_min"]
    return table.take(np.sort(first_rows.to_numpy()))


def load_parquet(root: str | Path, experiment: str | None = None) -> tuple[pa.Table, pa.Table]:
    """(impressions, events) from rerank.eventlog.sink's `<root>/impressions` and `<root>/events` (hive
    `day=` partitions), each stream_id once; empty tables with the schemas where absent.
    `experiment`: only that experiment's rows (what `report` reads; attributed events carry it)."""
    root = Path(root)
    return (_read_dataset(root / "impressions", IMPRESSION_SCHEMA, experiment),
            _read_dataset(root / "events", EVENT_SCHEMA, experiment))


def plot_report(report: dict, out_dir: str | Path) -> list[Path]:
    """PNG plots of a report: CTR over time per arm (with a +-1.96 se band), CTR by position per
    arm and, for interleaving, the preference share over looks. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = report["experiment"]
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4))
    for arm in report["arms"]:
        rows = [r for r in arm["over_time"] if r["ctr"] is not None]
        t = np.array([(r["t"] - report["start"]) / 3600 for r in rows])
        ctr = np.array([r["ctr"] for r in rows])
        se = np.array([r["ctr_se"] if r["ctr_se"] is not None else 0.0 for r in rows])
        line, = ax.plot(t, ctr, marker=".", label=arm["arm"])
        ax.fill_between(t, ctr - 1.96 * se, ctr + 1.96 * se, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="hours since start", ylabel="CTR", title=f"{name}: CTR per look bucket")
    ax.legend()
    paths.append(_save(fig, out_dir / f"{name}-ctr-over-time.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    for arm in report["arms"]:
        values = [np.nan if v is None else v for v in arm["ctr_by_position"]]
        ax.plot(range(1, len(values) + 1), values, marker="o", label=arm["arm"])
    ax.set(xlabel="position", ylabel="CTR", title=f"{name}: CTR by position")
    ax.legend()
    paths.append(_save(fig, out_dir / f"{name}-ctr-by-position.png"))

    if "interleaving" in report:
        inter = report["interleaving"]
        looks = inter["looks"]
        t = [(row["t"] - report["start"]) / 3600 for row in looks]
        share = [np.nan if row["diff"] is None else row["diff"] + 0.5 for row in looks]
        lo = [np.nan if row["ci"][0] is None else row["ci"][0] + 0.5 for row in looks]
        hi = [np.nan if row["ci"][1] is None else row["ci"][1] + 0.5 for row in looks]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(t, share, marker=".", label=f"share of {inter['teams'][0]}")
        ax.fill_between(t, lo, hi, alpha=0.2, label="always-valid CI")
        ax.axhline(0.5, color="grey", linestyle="--")
        ax.set(xlabel="hours since start", ylabel="preference share", ylim=(0, 1),
               title=f"{name}: interleaving preference")
        ax.legend()
        paths.append(_save(fig, out_dir / f"{name}-preference.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

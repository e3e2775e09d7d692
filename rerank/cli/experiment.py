"""`rerank experiment report NAME --data DIR`: the readout of an experiment from the sink's Parquet."""

from __future__ import annotations

import json
import math

from rerank.cli.errors import CommandError


def register(subparsers) -> None:
    experiment = subparsers.add_parser("experiment", help="read out experiments from the sink's Parquet")
    sub = experiment.add_subparsers(dest="experiment_command", required=True)

    rep = sub.add_parser("report", help="per-arm metrics and always-valid comparisons of one experiment",
                         description="Per arm: impressions, users, CTR, conversion, revenue, CTR by position; "
                         "each arm against the first with an always-valid (mSPRT) interval and p-value at "
                         "every look; interleaving: the preference share of the first team.")
    rep.add_argument("name", help="experiment name")
    rep.add_argument("--data", required=True, metavar="DIR",
                     help="the sink's output directory (with impressions/ and events/)")
    rep.add_argument("--json", action="store_true", help="print the full report as JSON")
    rep.add_argument("--plots", metavar="DIR", help="also write PNG plots into DIR")
    rep.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    rep.add_argument("--tau", type=float, help="mixture scale of the mSPRT, one absolute value for every "
                     "comparison (default: 10%% of each metric's pooled level)")
    rep.add_argument("--weights", metavar="ARM=W,...",
                     help="the A/B arms' configured weights (e.g. control=1,new=1): adds the sample ratio "
                     "mismatch check of users per arm")
    rep.add_argument("--look-every", type=float, default=3600.0, metavar="S",
                     help="seconds between looks (default 3600)")
    rep.set_defaults(func=run_report)


def run_report(args) -> int:
    from pathlib import Path

    from rerank.experiments.readout import load_parquet, plot_report, report

    if not Path(args.data).is_dir():
        raise CommandError(f"--data {args.data}: not a directory")
    impressions, events = load_parquet(args.data)
    try:
        result = report(args.name, impressions, events, alpha=args.alpha, tau=args.tau,
                        look_every_s=args.look_every, weights=parse_weights(args.weights))
    except ValueError as err:
        raise CommandError(str(err)) from None
    if not result["impressions"]:
        raise CommandError(f"no impressions of experiment {args.name!r} in {args.data}")
    if args.plots:
        result["plots"] = [str(path) for path in plot_report(result, args.plots)]
    print(json.dumps(result) if args.json else summary(result))
    return 0


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _ci(ci: list) -> str:
    return f"[{_fmt(ci[0], '+.4f')}, {_fmt(ci[1], '+.4f')}]"


def _significance(row: dict, alpha: float) -> str:
    first = row["first_significant_impressions"]
    return f"significant at {first:,} impressions" if first is not None else f"not significant at {alpha}"


def parse_weights(text: str | None) -> dict[str, float] | None:
    """`control=1,new=1` -> {"control": 1.0, "new": 1.0}; CommandError naming a bad part."""
    if not text:
        return None
    weights = {}
    for part in text.split(","):
        arm, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not arm.strip() or not weight >= 0 or not math.isfinite(weight):
            raise CommandError(f"--weights: expected ARM=W with W a finite number >= 0, got {part!r}")
        weights[arm.strip()] = weight
    return weights


def summary(result: dict) -> str:
    """A short human-readable table of a report."""
    lines = [f"experiment {result['experiment']} ({result['type']}): {result['impressions']:,} impressions, "
             f"looks every {result['look_every_s']:g} s, alpha {result['alpha']}",
             f"{'arm':16} {'impressions':>11} {'users':>7} {'ctr':>7} {'conv':>7} {'rev/imp':>8}"]
    for arm in result["arms"]:
        lines.append(f"{arm['arm']:16} {arm['impressions']:>11,} {arm['users']:>7,} {_fmt(arm['ctr']):>7} "
                     f"{_fmt(arm['conversion_rate']):>7} {_fmt(arm['revenue_per_impression'], '.3f'):>8}")
    for row in result["comparisons"]:
        lines.append(f"{row['arm']} vs {row['baseline']} {row['metric']}: diff {_fmt(row['diff'], '+.4f')} "
                     f"CI {_ci(row['ci'])} p {row['p']:.4f}, {_significance(row, result['alpha'])}")
    if "interleaving" in result:
        inter = result["interleaving"]
        first, second = inter["teams"]
        lines.append(f"interleaving: {first} {inter['wins'][first]:,} wins, {second} {inter['wins'][second]:,}, "
                     f"ties {inter['ties']:,}; share of {first} {_fmt(inter['share'])} CI {_ci(inter['share_ci'])} "
                     f"p {inter['p']:.4f}, {_significance(inter, result['alpha'])}")
    srm = result.get("srm")
    if srm and srm["checked"]:
        users = ", ".join(f"{arm} {n:,}" for arm, n in srm["users"].items())
        verdict = "SAMPLE RATIO MISMATCH: do not trust the comparisons" if srm["mismatch"] else "no mismatch"
        lines.append(f"sample ratio: users {users}; chi2 {srm['chi2']:.2f}, p {srm['p']:.4g}: {verdict}")
    for path in result.get("plots", []):
        lines.append(f"plot: {path}")
    return "\n".join(lines)

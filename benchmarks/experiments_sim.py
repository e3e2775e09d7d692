"""Experiments measured on the live simulator: is the readout honest, how much traffic does each
design need, does online learning pay, and what does recording cost.

    python benchmarks/experiments_sim.py [--only aa,ab,interleave,online,overhead] [--aa-runs 20] [--json]

Starts the local stack (deployments/local.py: local Ray, an embedded real Redis, the app on the
demo shop with its trained SASRec; the app-wide trainer off so arms stay fixed) plus a popularity
model, then, each scenario a live change of the experiment book (PUT /admin/experiments):
- aa: `--aa-runs` A/A experiments (two identical arms, a new salt and new users each run);
  how many are significant at 5% (the readout's always-valid test, a look every 5 s);
- ab: the trained model against popularity, users split 50/50: ground-truth and observed CTR,
  and the impressions the always-valid test needed to call it;
- interleave: the same two models team-draft interleaved: preference share and impressions needed;
- close: both designs again for a smaller difference (the model against itself with MMR
  diversity 0.5);
- online: an arm with its own online trainer (`--online-lr`, `--online-trainable`) against a
  frozen arm after the shop changed (every item's successors re-drawn,
  `ShopTruth.with_new_successors`), interests drifting: CTR per arm per time window and per half
  with the uplift's always-valid interval, and each arm's ground-truth CTR per 2,000 requests
  (benchmarks/online_learning_sim.py asks the same question in one process, paired);
- overhead: /rank with and without impression recording, interleaved, c=1 and c=8 (same run).
A/B and interleaving runs simulate max(600, requests / 10) users (more traffic, more users).
Impressions and events are read back from the Redis streams of each run. Prints one JSON object
and writes benchmarks/results/experiments_sim.json (+ PNGs). Numbers, not verdicts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import scenario_list  # noqa: E402

SCENARIOS = ("aa", "ab", "interleave", "close", "online", "overhead")
OUT = ROOT / "benchmarks" / "results" / "experiments_sim.json"
POP_MODEL = ROOT / "artifacts" / "models" / "demo-shop-pop"


def ensure_pop_model(data: Path) -> Path:
    if not (POP_MODEL / "config.json").is_file():
        from rerank.models.train import train

        train("pop", data, POP_MODEL, evaluate_valid=False)
    return POP_MODEL


class Book:
    """The live experiment book of the stack, over its admin route."""

    def __init__(self, client) -> None:
        self.client = client
        self.specs: dict[str, dict] = {}

    def put(self, name: str, spec: dict) -> None:
        r = self.client.put(f"/admin/experiments/{name}", json=spec)
        r.raise_for_status()
        self.specs[name] = spec

    def only(self, name: str | None) -> None:
        """Traffic 1.0 to `name`, 0 to every other experiment (lowered first: the book stays <= 100%)."""
        for other, spec in self.specs.items():
            if other != name and spec.get("traffic", 1.0) > 0:
                self.put(other, {**spec, "traffic": 0.0})
        if name is not None:
            self.put(name, {**self.specs[name], "traffic": 1.0})
        time.sleep(1.5)  # replicas re-read the book every second


def read_streams(redis_url: str, prefix: str, since_ms: int):
    """Impressions and events added to the streams since `since_ms` (rerank.eventlog.records tables)."""
    import redis

    from rerank.store.keys import Keys
    from rerank.eventlog.records import event_row, events_table, impression_row, impressions_table

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = Keys(prefix)

    def rows(stream: str, parse) -> list[dict]:
        out, start = [], f"{since_ms}-0"
        while True:
            batch = client.xrange(stream, min=start, count=10_000)
            out.extend(parse(i, f) for i, f in batch)
            if len(batch) < 10_000:
                return out
            ms, seq = batch[-1][0].split("-")
            start = f"{ms}-{int(seq) + 1}"

    return impressions_table(rows(keys.impressions, impression_row)), events_table(rows(keys.events, event_row))


def simulate(url: str, truth, seed: int, requests: int, users: int, concurrency: int = 8, drift_every: int = 20,
             post_views: bool = False, propensity_sd: float = 0.0, truth_every: int = 1000):
    from rerank.clients.simulate import ChoiceModel, Drift, SimConfig, simulate as run

    cfg = SimConfig(url=url, n_users=users, requests=requests, concurrency=concurrency, seed=seed,
                    drift=Drift(every=drift_every), post_views=post_views,
                    choice=ChoiceModel(propensity_sd=propensity_sd), truth_every=truth_every)
    return run(truth, cfg, progress=True)


def _ctr_test(report: dict) -> dict:
    return next(c for c in report["comparisons"] if c["metric"] == "ctr")


def scenario_aa(ctx: dict, runs: int, requests: int) -> dict:
    results = []
    for i in range(runs):
        ctx["book"].put("aa", {"salt": f"aa-{i}", "traffic": 1.0, "arms": {"a": {}, "b": {}}})
        ctx["book"].only("aa")
        since = int(time.time() * 1000)
        sim = simulate(ctx["url"], ctx["truth"], seed=1000 + i, requests=requests, users=300,
                       propensity_sd=ctx["propensity_sd"])
        rep = ctx["report"]("aa", *read_streams(ctx["redis_url"], ctx["prefix"], since), arms=["a", "b"],
                            look_every_s=5.0)
        test = _ctr_test(rep)
        results.append({"run": i, "impressions": rep["impressions"], "diff": test["diff"], "p": test["p"],
                        "significant": test["significant"], "sim_errors": sim["errors"]})
        print(f"aa run {i}: p={test['p']:.3f} diff={test['diff']:+.4f}", file=sys.stderr)
    significant = sum(r["significant"] for r in results)
    return {"runs": runs, "requests_per_run": requests, "significant_at_5pct": significant,
            "p_values": [round(r["p"], 4) for r in results], "per_run": results}


def scenario_ab(ctx: dict, name: str, arms: dict, order: list[str], requests: int, seed: int) -> dict:
    """A/B of `arms` (users split by weight); `order[0]` is the baseline of the readout."""
    book = ctx["book"]
    book.put(name, {"traffic": 0.0, "arms": arms})
    book.only(name)
    since = int(time.time() * 1000)
    sim = simulate(ctx["url"], ctx["truth"], seed=seed, requests=requests, users=max(600, requests // 10),
                   propensity_sd=ctx["propensity_sd"])
    rep = ctx["report"](name, *read_streams(ctx["redis_url"], ctx["prefix"], since), arms=order, look_every_s=2.0)
    ctx["reports"][name] = rep
    test = _ctr_test(rep)
    return {"requests": requests, "truth": {arm: {k: sim["arms"][arm][k] for k in ("expected_ctr", "ctr")}
                                             for arm in sim["arms"]},
            "arms": {a["arm"]: {"impressions": a["impressions"], "ctr": a["ctr"]} for a in rep["arms"]},
            "ctr_diff": test["diff"], "ci": test["ci"], "p": test["p"],
            "first_significant_impressions": test["first_significant_impressions"]}


def scenario_interleave(ctx: dict, name: str, arms: dict, requests: int, seed: int) -> dict:
    """The two `arms` team-draft interleaved in every list."""
    book = ctx["book"]
    book.put(name, {"type": "interleave", "traffic": 0.0, "arms": arms})
    book.only(name)
    since = int(time.time() * 1000)
    simulate(ctx["url"], ctx["truth"], seed=seed, requests=requests, users=max(600, requests // 10),
             propensity_sd=ctx["propensity_sd"])
    rep = ctx["report"](name, *read_streams(ctx["redis_url"], ctx["prefix"], since), arms=list(arms),
                        look_every_s=2.0)
    ctx["reports"][name] = rep
    il = rep["interleaving"]
    return {"requests": requests, "impressions": rep["impressions"], "wins": il["wins"], "ties": il["ties"],
            "share_first": il["share"], "share_ci": il["share_ci"], "p": il["p"],
            "first_significant_impressions": il["first_significant_impressions"]}


def _needed_ratio(results: dict, ab: str, il: str) -> float | None:
    ab_n = results.get(ab, {}).get("first_significant_impressions")
    il_n = results.get(il, {}).get("first_significant_impressions")
    return il_n / ab_n if ab_n and il_n else None


def scenario_online(ctx: dict, requests: int, window_s: float, post_views: bool) -> dict:
    """Learner vs frozen after the shop changed; CTR and uplift per time window (not cumulative)."""
    import pyarrow.compute as pc

    ctx["book"].only("learn")
    changed = ctx["truth"].with_new_successors(seed=7)
    since = int(time.time() * 1000)
    sim = simulate(ctx["url"], changed, seed=4000, requests=requests, users=400, drift_every=20,
                   post_views=post_views, truth_every=2000)
    impressions, events = read_streams(ctx["redis_url"], ctx["prefix"], since)
    t0, t1 = pc.min(impressions["ts"]).as_py(), pc.max(impressions["ts"]).as_py()
    windows = []
    start = t0
    while start < t1:
        part = impressions.filter(pc.and_(pc.greater_equal(impressions["ts"], start),
                                          pc.less(impressions["ts"], start + window_s)))
        rep = ctx["report"]("learn", part, events, arms=["frozen", "learner"], look_every_s=window_s * 10)
        test = _ctr_test(rep)
        arms = {a["arm"]: a["ctr"] for a in rep["arms"]}
        windows.append({"from_s": round(start - t0, 1), "impressions": rep["impressions"], "ctr": arms,
                        "uplift": test["diff"], "ci": test["ci"], "p": test["p"]})
        start += window_s
    halves = []
    middle = (t0 + t1) / 2
    for lo, hi in ((t0, middle), (middle, t1 + 1)):
        part = impressions.filter(pc.and_(pc.greater_equal(impressions["ts"], lo), pc.less(impressions["ts"], hi)))
        test = _ctr_test(ctx["report"]("learn", part, events, arms=["frozen", "learner"], look_every_s=window_s))
        halves.append({"uplift": test["diff"], "ci": test["ci"], "p": test["p"]})
    whole = ctx["report"]("learn", impressions, events, arms=["frozen", "learner"], look_every_s=window_s)
    ctx["reports"]["learn"] = whole
    test = _ctr_test(whole)
    trainer = ctx["client"].get("/admin/trainer").json().get("arms", {}).get("learn/learner", {})
    return {"requests": requests, "window_s": window_s, "lr": ctx["online_lr"], "trainable": ctx["online_trainable"],
            "post_views": post_views, "windows": windows, "first_half": halves[0], "second_half": halves[1],
            "overall_uplift": test["diff"],
            "overall_ci": test["ci"], "p": test["p"],
            "truth": {arm: sim["arms"][arm]["expected_ctr"] for arm in sim["arms"]},
            "truth_by_2000_requests": {arm: sim["arms"][arm]["expected_ctr_by_window"] for arm in sim["arms"]},
            "degraded_answers": sim["degraded"], "sim_errors": sim["errors"],
            "learner_trainer": {k: trainer.get(k) for k in ("version", "events_trained", "events_other_arm",
                                                            "versions_published", "guard_refusals")}}


def scenario_overhead(ctx: dict, duration_s: float, rounds: int) -> dict:
    """/rank with and without impression recording on the same stack, alternating run by run
    (`rounds` times at c=1 and c=8); medians over the rounds."""
    import statistics

    from rerank.clients.bench import LoadConfig, compare, make_rank_bodies

    ctx["book"].only(None)
    truth = ctx["truth"]
    bodies = make_rank_bodies([f"bench-u{i}" for i in range(500)], truth.item_ids[1:], 200, k=20)
    targets = {"record": f"{ctx['url']}/rank", "no_record": f"{ctx['url']}/norecord/rank"}
    rows = []
    for _ in range(rounds):
        rows += compare(targets, bodies, [1, 8], LoadConfig(duration_s=duration_s), baseline=None)["rows"]
    out = {"rounds": rounds, "duration_s": duration_s, "candidates": 200}
    for c in (1, 8):
        point = {}
        for name in targets:
            mine = [r for r in rows if r["concurrency"] == c and r["target"] == name]
            point[name] = {key: round(statistics.median(r[key] for r in mine), 3)
                           for key in ("p50_ms", "p99_ms", "requests_per_s")}
        point["p50_overhead_ms"] = round(point["record"]["p50_ms"] - point["no_record"]["p50_ms"], 3)
        out[f"c{c}"] = point
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=scenario_list(SCENARIOS), default=",".join(SCENARIOS))
    parser.add_argument("--aa-runs", type=int, default=20)
    parser.add_argument("--aa-requests", type=int, default=1500)
    parser.add_argument("--ab-requests", type=int, default=6000)
    parser.add_argument("--interleave-requests", type=int, default=3000)
    parser.add_argument("--online-requests", type=int, default=32000)
    parser.add_argument("--online-window-s", type=float, default=20.0)
    parser.add_argument("--online-lr", type=float, default=1e-3, help="the learner arm's learning rate")
    parser.add_argument("--online-trainable", default="all", choices=["all", "items"],
                        help="what the learner arm's steps update (rerank.online.config.OnlineConfig.trainable)")
    parser.add_argument("--post-views", action="store_true",
                        help="simulated users also post views of what they examine")
    parser.add_argument("--overhead-seconds", type=float, default=10.0)
    parser.add_argument("--overhead-rounds", type=int, default=3)
    parser.add_argument("--propensity-sd", type=float, default=0.0,
                        help="aa/ab/interleave/close: users differ in how much they click (logit sd; default 0)")
    parser.add_argument("--results-key", default="",
                        help="store this run's results under keys (and plot folders) with this suffix")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    only = args.only

    import httpx
    from ray import serve

    from deployments.app import build_app
    from deployments.local import DEMO_DATA, DEMO_MODEL, LocalStack, LocalStackConfig, ensure_demo_data, ensure_model
    from rerank.experiments.readout import plot_report, report
    from rerank.clients.simulate import ShopTruth
    from rerank.infra.results import write_results

    data = ensure_demo_data(DEMO_DATA)
    ensure_model(data, DEMO_MODEL)
    pop = ensure_pop_model(data)
    learner_registry = tempfile.mkdtemp(prefix="rerank-learner-")
    learn = {"traffic": 0.0, "arms": {"frozen": {}, "learner": {
        "registry_uri": learner_registry, "online": {"publish_every_s": 2.0, "lr": args.online_lr,
                                                     "trainable": args.online_trainable}}}}
    prefix = "rr:"
    config = LocalStackConfig(port=args.port, online=False, app_args={
        "experiments": {"learn": learn}, "redis_prefix": prefix, "catalogue_refresh_s": 5.0,
        # arm locations: the models next to the app's (the pop model) and the learner's temporary registry
        "model_roots": [str(DEMO_MODEL.parent), str(POP_MODEL.parent), learner_registry],
        "allow_no_auth": True})  # a loopback stack of its own, without keys
    results: dict = {"scenarios": only}
    with LocalStack(config) as stack:
        app = {**stack.app_args(), "record_impressions": False, "experiments": {}}
        serve.run(build_app(app), name="rerank-norecord", route_prefix="/norecord")
        client = httpx.Client(base_url=stack.url, timeout=30)
        book = Book(client)
        book.specs["learn"] = learn
        ctx = {"url": stack.url, "client": client, "book": book, "truth": ShopTruth.from_dataset(data),
               "pop": pop, "redis_url": stack.redis_url, "prefix": prefix, "report": report, "reports": {},
               "online_lr": args.online_lr, "online_trainable": args.online_trainable,
               "propensity_sd": args.propensity_sd}
        started = time.time()
        if "aa" in only:
            results["aa"] = scenario_aa(ctx, args.aa_runs, args.aa_requests)
        pop_arms = {"model": {}, "pop": {"model": str(pop)}}
        close_arms = {"model": {}, "diverse": {"rules": {"diversity": 0.5}}}
        if "ab" in only:
            results["ab"] = scenario_ab(ctx, "ab", pop_arms, ["pop", "model"], args.ab_requests, seed=2000)
        if "interleave" in only:
            results["interleave"] = scenario_interleave(ctx, "il", pop_arms, args.interleave_requests, seed=3000)
        if "ab" in results and "interleave" in results:
            results["interleave_vs_ab_impressions"] = _needed_ratio(results, "ab", "interleave")
        if "close" in only:  # a smaller difference: the model against itself with strong MMR diversity
            results["ab_close"] = scenario_ab(ctx, "ab-close", close_arms, ["diverse", "model"], args.ab_requests,
                                              seed=5000)
            results["interleave_close"] = scenario_interleave(ctx, "il-close", close_arms, args.interleave_requests,
                                                              seed=6000)
            results["close_interleave_vs_ab_impressions"] = _needed_ratio(results, "ab_close", "interleave_close")
        if "online" in only:
            results["online"] = scenario_online(ctx, args.online_requests, args.online_window_s, args.post_views)
        if "overhead" in only:
            results["overhead"] = scenario_overhead(ctx, args.overhead_seconds, args.overhead_rounds)
        results["wall_s"] = round(time.time() - started, 1)
        plots = []
        for name, rep in ctx["reports"].items():
            folder = OUT.parent / f"experiments_{name}{'_' + args.results_key if args.results_key else ''}"
            plots += [str(p.relative_to(ROOT)) for p in plot_report(rep, folder)]
        results["plots"] = plots
        client.close()
    if args.results_key:  # a variant run (e.g. other users) kept beside the default one
        results = {(f"{k}_{args.results_key}" if k not in ("scenarios", "wall_s", "plots") else k): v
                   for k, v in results.items()}
        results["propensity_sd"] = args.propensity_sd
    write_results(OUT, results, merge=True)  # the scenarios not run keep their entries
    print(json.dumps(results, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

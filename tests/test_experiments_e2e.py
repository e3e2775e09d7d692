"""End to end: experiments on real Ray Serve + real Redis: arms with their own models, team-draft
interleaving, impressions and attribution on the streams, the Parquet sink, the readout route,
live changes to the book, and an arm with its own online trainer fed by its arm's events only.
Each test runs on the inline layout (the Scorer deployment holds the arms' models) and on the fused
one (the ingress replica does), each with its own prefix, sink and arm registry."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
import redis

from online_helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

APP = "rerank-experiments"
LAYOUTS = ("inline", "fused")
N_USERS = 160


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A small synthetic shop, a SASRec trained in seconds (the app's model) and a popularity model."""
    from rerank.models.train import train
    from online_helpers import small_shop

    root = tmp_path_factory.mktemp("xp")
    small_shop(root, seed=4)
    train("pop", root / "data", root / "pop", evaluate_valid=False)
    return root


@pytest.fixture(scope="module", params=LAYOUTS)
def service(request, serve_url, redis_server, shop):
    from ray import serve

    from deployments.app import build_app, ensure_loaded

    layout = request.param
    prefix, name, route, sink = f"xp-{layout}:", f"{APP}-{layout}", f"/xp-{layout}", shop / f"sink-{layout}"
    redis_server.start()
    ensure_loaded(redis_server.url, str(shop / "data"), prefix)
    experiments = {
        "ab": {"traffic": 0.4, "arms": {"control": {}, "pop": {"model": str(shop / "pop")}}},
        "il": {"type": "interleave", "traffic": 0.3, "arms": {"model": {}, "pop": {"model": str(shop / "pop")}}},
        "learn": {"traffic": 0.3, "arms": {
            "frozen": {},
            "learner": {"registry_uri": str(shop / f"learner-registry-{layout}"),
                        "online": {"publish_every_s": 0.3, "publish_every_events": 20, "holdout_every": 0}}}},
    }
    args = {
        "layout": layout, "model": str(shop / "model"), "redis_url": redis_server.url, "redis_prefix": prefix,
        "online": {"enabled": False, "num_cpus": 0.1}, "catalogue_refresh_s": 0, "experiments": experiments,
        "sink": {"enabled": True, "out_dir": str(sink)}, "allow_no_auth": True,
    }  # fmt: skip
    serve.run(build_app(args), name=name, route_prefix=route)
    client = httpx.Client(base_url=f"{serve_url}{route}", timeout=30)
    from rerank.data.dataset import load_dataset

    items = [str(i) for i in load_dataset(shop / "data").item_ids[1:]]
    yield {"client": client, "redis": redis.Redis.from_url(redis_server.url, decode_responses=True),
           "items": items, "shop": shop, "prefix": prefix, "url": f"{serve_url}{route}", "sink": sink}
    client.close()
    serve.delete(name)  # blocking: its EventSink and trainers stop (and release their leases) before the next module


def _post_events(client: httpx.Client, events: list[dict]) -> dict:
    """POST /events as a client should: a 503 (Redis slow on a loaded machine) is retried after
    its Retry-After; event ids make the retry safe."""
    for _ in range(10):
        r = client.post("/events", json={"events": events})
        if r.status_code != 503:
            assert r.status_code == 200, r.text
            return r.json()
        time.sleep(float(r.headers.get("Retry-After", "1")))
    raise AssertionError("/events kept answering 503")


def _rank_all(service, users: list[str], k: int = 8) -> dict[str, dict]:
    answers = {}
    for user in users:
        r = service["client"].post("/rank", json={"user_id": user, "candidates": service["items"][:60], "k": k})
        assert r.status_code == 200, r.text
        answers[user] = r.json()
    return answers


def test_answers_name_their_arm_serve_its_model_and_are_recorded(service):
    r, prefix = service["redis"], service["prefix"]
    before = r.xlen(f"{prefix}impressions")
    answers = _rank_all(service, [f"xu{i}" for i in range(N_USERS)])
    assert r.xlen(f"{prefix}impressions") - before == N_USERS  # one impression per answer
    by_exp = {}
    for a in answers.values():
        by_exp.setdefault(a["experiment"], set()).add(a["arm"])
        if a["arm"] == "pop":
            assert a["model_version"] == "dir:pop"
        if a["experiment"] == "il":
            assert a["arm"] == "interleaved" and "+" in a["model_version"]
    assert by_exp["ab"] == {"control", "pop"} and by_exp["il"] == {"interleaved"}
    assert by_exp["learn"] == {"frozen", "learner"}
    # the same user gets the same arm on every request (stable salted assignment)
    again = _rank_all(service, [f"xu{i}" for i in range(40)])
    assert all(again[u]["arm"] == answers[u]["arm"] for u in again)


def test_interleaved_lists_mix_both_arms_fairly(service):
    answers = _rank_all(service, [f"xi{i}" for i in range(N_USERS)])
    from rerank.experiments.attribution import read_shown
    from rerank.store.keys import Keys

    interleaved = [(u, a) for u, a in answers.items() if a["experiment"] == "il"]
    assert interleaved
    leaders = []
    for user, a in interleaved:
        shown = read_shown(service["redis"], Keys(service["prefix"]), user, a["request_id"])
        teams = [shown[item["item_id"]][1] for item in a["items"]]
        assert set(teams) == {"model", "pop"}
        for n in range(1, len(teams) + 1):  # every prefix: the teams' counts differ by at most one
            assert abs(teams[:n].count("model") - teams[:n].count("pop")) <= 1
        leaders.append(teams[0])
    assert 0.2 < leaders.count("model") / len(leaders) < 0.8  # coin flips decide who leads


def test_events_are_attributed_sunk_to_parquet_and_read_out(service):
    client, r = service["client"], service["redis"]
    answers = _rank_all(service, [f"xe{i}" for i in range(N_USERS)])
    events = []
    for n, (user, a) in enumerate(answers.items()):
        item = a["items"][1]["item_id"]
        with_id = n % 2 == 0  # half by request_id, half left to the window
        events.append({"event_id": f"c-{user}", "user_id": user, "item_id": item, "type": "click",
                       **({"request_id": a["request_id"], "position": 2} if with_id else {})})
        if n % 4 == 0:
            events.append({"event_id": f"p-{user}", "user_id": user, "item_id": item, "type": "purchase",
                           "request_id": a["request_id"], "position": 2, "value": 25.0})
    events.append({"event_id": "never-shown", "user_id": "xe0", "item_id": service["items"][-1], "type": "click"})
    answer = _post_events(client, events)  # a retry after a partial write counts the rest as duplicates
    assert answer["accepted"] + answer["duplicates"] == len(events)

    stream = {f["event_id"]: f for _, f in r.xrange(f"{service['prefix']}events") if f["event_id"] in
              {e["event_id"] for e in events}}
    for n, (user, a) in enumerate(answers.items()):
        got = stream[f"c-{user}"]
        assert (got["request_id"], got["position"], got["experiment"]) == (a["request_id"], "2", a["experiment"])
        assert got["attributed"] == ("request_id" if n % 2 == 0 else "window")
        if a["experiment"] == "il":
            assert got["team"] in ("model", "pop")
        else:
            assert got["arm"] == a["arm"]
    assert stream["never-shown"]["attributed"] == "" and stream["never-shown"]["arm"]  # the user's arm still
    assert stream[f"p-{next(iter(answers))}"]["value"] == "25.0"

    # the sink persists both streams; the readout counts exactly what was sent
    from rerank.experiments.readout import load_parquet

    sink = service["sink"]

    def persisted():
        impressions, sunk = load_parquet(sink)
        ids = set(sunk["event_id"].to_pylist())
        return impressions if {e["event_id"] for e in events} <= ids else None

    impressions = wait_until(persisted, "the sink to write the events", timeout_s=60)
    assert set(impressions["request_id"].to_pylist()) >= {a["request_id"] for a in answers.values()}
    report = client.get("/experiments/ab/report").json()
    ab_users = [u for u, a in answers.items() if a["experiment"] == "ab"]
    sent_clicks = sum(1 for u in ab_users)  # every answer got one click
    arms = {arm["arm"]: arm for arm in report["arms"]}
    assert set(arms) == {"control", "pop"}
    assert sum(arm["clicked_impressions"] for arm in arms.values()) >= sent_clicks
    assert {c["metric"] for c in report["comparisons"]} >= {"ctr"} and "p" in json.dumps(report["comparisons"])
    assert report["srm"]["checked"] and set(report["srm"]["users"]) == {"control", "pop"}  # the book's weights
    il = client.get("/experiments/il/report").json()
    assert il["type"] == "interleave"
    assert sum(il["interleaving"]["wins"].values()) + il["interleaving"]["ties"] >= 1
    assert client.get("/admin/sink").json()["state"] == "running"


def test_the_book_changes_live_without_a_restart(service):
    client = service["client"]
    users = [f"xl{i}" for i in range(N_USERS)]
    ab_users = [u for u, a in _rank_all(service, users).items() if a["experiment"] == "ab"]
    ramp = {"traffic": 0.4, "arms": {"control": {"weight": 1}, "pop": {"weight": 0, "model": str(service["shop"] / "pop")}}}
    assert client.put("/admin/experiments/ab", json=ramp).status_code == 200
    wait_until(lambda: {a["arm"] for a in _rank_all(service, ab_users).values()} == {"control"},
               "every ab user on control after ramping pop to 0", timeout_s=10)
    assert client.delete("/admin/experiments/il").json()["status"] == "stopped"
    after = _rank_all(service, users)
    assert "il" not in {a["experiment"] for a in after.values()}
    assert client.get("/experiments").json()["experiments"]["il"]["status"] == "stopped"
    # refused: relative model paths, an online arm without its deployed trainer, a full book
    bad = {"arms": {"a": {"model": "relative/path"}}, "traffic": 0.0}
    assert client.put("/admin/experiments/new", json=bad).status_code == 409
    online = {"traffic": 0.0, "arms": {"a": {"registry_uri": str(service["shop"] / "no-trainer"), "online": {}}}}
    assert client.put("/admin/experiments/new", json=online).status_code == 409
    assert client.put("/admin/experiments/new", json={"traffic": 0.5, "arms": {"a": {}}}).status_code == 422
    assert client.delete("/admin/experiments/none-such").status_code == 404
    client.put("/admin/experiments/ab", json={**ramp, "arms": {**ramp["arms"], "pop": {**ramp["arms"]["pop"], "weight": 1}}})


def test_an_arm_with_online_learning_trains_on_its_arms_events_only(service):
    client = service["client"]
    answers = _rank_all(service, [f"xo{i}" for i in range(N_USERS)])
    learner = [u for u, a in answers.items() if a["arm"] == "learner"]
    others = [u for u, a in answers.items() if a["arm"] != "learner"]
    assert learner and others
    events = [{"event_id": f"o-{uuid.uuid4().hex}", "user_id": u, "item_id": answers[u]["items"][j]["item_id"],
               "type": "click", "request_id": answers[u]["request_id"], "position": j + 1}
              for u in learner + others for j in range(3)]
    answer = _post_events(client, events)  # a retry after a partial write counts the rest as duplicates
    assert answer["accepted"] + answer["duplicates"] == len(events)

    def arm_stats():
        stats = client.get("/admin/trainer").json()["arms"]["learn/learner"]
        return stats if stats.get("events_trained", 0) >= 3 * len(learner) and stats.get("versions_published") else None

    stats = wait_until(arm_stats, "the arm trainer to train on its events and publish", timeout_s=120)
    assert stats["events_other_arm"] >= 3 * len(others)  # everyone else's events are skipped
    assert stats["events_trained"] + stats["events_heldout"] <= stats["events_applied"] - stats["events_other_arm"]

    def learner_serves_new_version():
        a = client.post("/rank", json={"user_id": learner[0], "candidates": service["items"][:60]}).json()
        return a["model_version"] != "v1" and a["model_version"].startswith("v")

    wait_until(learner_serves_new_version, "the learner arm to serve its trainer's version", timeout_s=30)
    frozen = [u for u, a in answers.items() if a["arm"] == "frozen"]
    if frozen:
        a = client.post("/rank", json={"user_id": frozen[0], "candidates": service["items"][:60]}).json()
        assert a["model_version"] == "dir:model"


def test_the_simulator_drives_the_live_service_and_its_events_are_attributed(service):
    from rerank.clients.simulate import SimConfig, ShopTruth, simulate

    r, prefix = service["redis"], service["prefix"]
    before = r.xlen(f"{prefix}events")
    truth = ShopTruth.from_dataset(service["shop"] / "data")
    summary = simulate(truth, SimConfig(url=service["url"], n_users=30, requests=120, concurrency=4, seed=11),
                       progress=False)
    assert summary["ok"] == 120 and not summary["errors"]["rank"] and not summary["errors"]["events"]
    assert summary["events_posted"] > 0 and r.xlen(f"{prefix}events") - before == summary["events_posted"]
    sim_events = [f for _, f in r.xrevrange(f"{prefix}events", count=summary["events_posted"])]
    assert all(f["attributed"] == "request_id" for f in sim_events)  # the simulator sends request_id + position
    assert set(summary["arms"]) <= {"control", "pop", "interleaved", "frozen", "learner", "default"}

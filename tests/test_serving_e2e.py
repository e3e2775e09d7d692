"""End to end: real Ray Serve + a real Redis server + a trained model, through HTTP (httpx).

One small synthetic shop and a model trained in seconds are built once for the module;
the app is deployed once (serve.run) and follows a model registry, so the hot swap is
exercised too. Redis outages are real: the server process is stopped and restarted.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PREFIX = "e2e:"
MAX_CANDIDATES = 50
APP = "rerank-e2e"
LAYOUTS = ("inline", "split", "fused")  # inline at /, the others at /LAYOUT


def wait_until(check, what: str, timeout_s: float = 60.0, every_s: float = 0.2):
    """Poll `check()` until it returns a truthy value (a wait, not a speed assertion)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as err:
            last = err
        time.sleep(every_s)
    raise AssertionError(f"gave up waiting for {what}: last result {last!r}")


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A small synthetic shop and a SASRec trained on it for a few seconds; a registry with v1."""
    from rerank.data.dataset import load_dataset
    from rerank.models.registry import ModelRegistry
    from online_helpers import small_shop

    root = tmp_path_factory.mktemp("e2e")
    small_shop(root, seed=3)
    registry = ModelRegistry(str(root / "registry"))
    registry.publish_dir(root / "model", {"note": "e2e initial"})
    return {"root": root, "data": root / "data", "model": root / "model", "registry": registry,
            "dataset": load_dataset(root / "data")}


@pytest.fixture(scope="module")
def service(serve_url, redis_server, shop):
    """The app deployed on Serve (HTTP on a free port), features bulk-loaded into the real Redis:
    the inline layout at /, the split and fused layouts of the same app at /split and /fused."""
    from ray import serve

    from deployments.app import build_app, ensure_loaded

    redis_server.start()
    ensure_loaded(redis_server.url, str(shop["data"]), PREFIX)
    args = {
        "layout": "inline", "model": str(shop["model"]), "registry_uri": shop["registry"].uri, "registry_poll_s": 0.2,
        "redis_url": redis_server.url, "redis_prefix": PREFIX, "max_candidates": MAX_CANDIDATES,
        "ingress_batch_wait_s": 0.02, "catalogue_refresh_s": 0, "online": {"enabled": False},
        "allow_no_auth": True,  # loopback test proxy, no keys
    }  # fmt: skip
    serve.run(build_app(args), name=APP, route_prefix="/")
    for layout in LAYOUTS[1:]:
        serve.run(build_app({**args, "layout": layout}), name=f"{APP}-{layout}", route_prefix=f"/{layout}")
    client = httpx.Client(base_url=serve_url, timeout=30)
    yield {"client": client, "url": serve_url, "redis": redis_server, **shop}
    client.close()
    for name in (APP, *(f"{APP}-{layout}" for layout in LAYOUTS[1:])):
        serve.delete(name, _blocking=False)  # replicas drain in the background; Ray stops at session end


def user_with_history(dataset, min_events: int = 8) -> str:
    for u in range(1, dataset.n_users + 1):
        if len(dataset.sequences[u]) >= min_events:
            return str(dataset.user_ids[u])
    raise AssertionError("no user with enough history in the synthetic shop")


def candidate_ids(dataset, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    picks = rng.choice(np.arange(1, dataset.n_items + 1), size=n, replace=False)
    return [str(dataset.item_ids[i]) for i in picks]


def test_rank_is_the_model_order_of_the_candidates(service):
    from rerank.store.feature_store import FeatureStore
    from rerank.models.recommender import load_model

    dataset, client = service["dataset"], service["client"]
    user = user_with_history(dataset)
    cands = candidate_ids(dataset, 30)
    body = {"user_id": user, "candidates": cands, "k": 30, "rules": {"exclude_purchased": False}}
    response = client.post("/rank", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    returned = [item["item_id"] for item in out["items"]]
    assert sorted(returned) == sorted(cands)  # a permutation of the candidates
    assert out["degraded"] is False and out["model_version"] == "v1" and out["feature_age_ms"] is not None

    # the model's own scores for the same history (read from the same store) and candidates
    features = FeatureStore(service["redis"].url, prefix=PREFIX).fetch([(user, cands)], history_len=50)[0]
    model = load_model(service["model"])
    expected = model.score([features.history], features.candidates[None, :].astype(np.int64),
                           [features.history_types])[0]
    by_id = dict(zip(cands, expected.tolist()))
    got = [item["score"] for item in out["items"]]
    np.testing.assert_allclose(got, [by_id[i] for i in returned], rtol=1e-4, atol=1e-5)
    assert all(a >= b for a, b in zip(got, got[1:])), "not in descending score order"
    assert returned[:5] == [cands[i] for i in np.argsort(-expected, kind="stable")[:5]]


def test_an_event_changes_the_next_ranking(service):
    dataset, client = service["dataset"], service["client"]
    user = "e2e-new-user"  # unknown user: cold start, then personalised by the events
    cands = candidate_ids(dataset, 40, seed=1)
    first = client.post("/rank", json={"user_id": user, "candidates": cands, "k": 40}).json()
    assert first["feature_age_ms"] is None  # no events yet
    bought = first["items"][0]["item_id"]
    events = [{"user_id": user, "item_id": item, "type": kind, "event_id": f"e2e-{user}-{n}"}
              for n, (item, kind) in enumerate([(cands[5], "view"), (cands[5], "click"), (bought, "purchase")])]
    stored = client.post("/events", json={"events": events})
    assert stored.status_code == 200, stored.text
    assert stored.json() == {"accepted": 3, "duplicates": 0}
    assert client.post("/events", json={"events": events[:1]}).json() == {"accepted": 0, "duplicates": 1}

    second = client.post("/rank", json={"user_id": user, "candidates": cands, "k": 40}).json()
    ids = [item["item_id"] for item in second["items"]]
    assert bought not in ids  # purchased items are excluded by default
    assert second["feature_age_ms"] is not None
    first_scores = {i["item_id"]: i["score"] for i in first["items"]}
    second_scores = {i["item_id"]: i["score"] for i in second["items"]}
    assert any(abs(first_scores[i] - second_scores[i]) > 1e-6 for i in second_scores), "history did not matter"


def test_whole_catalogue_and_rules(service):
    dataset, client = service["dataset"], service["client"]
    user = user_with_history(dataset)
    full = client.post("/rank", json={"user_id": user, "k": 15, "rules": {"exclude_purchased": False}}).json()
    ids = [i["item_id"] for i in full["items"]]
    assert len(ids) == 15 and set(ids) <= set(dataset.item_ids[1:].tolist())  # ranked from the catalogue

    cands = candidate_ids(dataset, 20, seed=4)
    plain = client.post("/rank", json={"user_id": user, "candidates": cands, "k": 20,
                                       "rules": {"exclude_purchased": False}}).json()
    order = [i["item_id"] for i in plain["items"]]
    last, first = order[-1], order[0]
    ruled = client.post("/rank", json={"user_id": user, "candidates": cands, "k": 5, "rules": {
        "exclude_purchased": False, "exclude": [first], "boost": {last: 1000.0}}}).json()
    ruled_ids = [i["item_id"] for i in ruled["items"]]
    assert ruled_ids[0] == last and first not in ruled_ids and len(ruled_ids) == 5


def test_the_three_layouts_return_identical_rankings(service):
    dataset, client = service["dataset"], service["client"]
    users = [user_with_history(dataset), "e2e-unknown-user", str(dataset.user_ids[3])]
    bodies = [{"user_id": u, "candidates": candidate_ids(dataset, 30, seed=10 + n), "k": 10}
              for n, u in enumerate(users)]
    bodies += [{"user_id": users[0], "candidates": candidate_ids(dataset, 25, seed=7), "k": 8,
                "rules": {"diversity": 0.4, "exclude": [bodies[0]["candidates"][0]]}},
               {"user_id": users[0], "k": 12}]  # whole catalogue
    for body in bodies:
        inline = client.post("/rank", json=body)
        assert inline.status_code == 200, inline.text
        a = inline.json()
        assert a["degraded"] is False
        for layout in LAYOUTS[1:]:
            other = client.post(f"/{layout}/rank", json=body)
            assert other.status_code == 200, (layout, other.text)
            b = other.json()
            assert a["model_version"] == b["model_version"] and b["degraded"] is False, (layout, b)
            assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]], (layout, body)
            np.testing.assert_allclose([i["score"] for i in a["items"]], [i["score"] for i in b["items"]],
                                       rtol=1e-6, err_msg=layout)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/rank", b'{"user_id": "u1", "candidates": [', "json"),
        ("/rank", {"user_id": "u1", "canditates": ["a"]}, "canditates"),
        ("/rank", {"user_id": "u1", "candidates": ["a"], "k": "many"}, "k"),
        ("/rank", {"user_id": "u1", "candidates": []}, "candidates"),
        ("/rank", {"user_id": "u1", "candidates": ["a", "b", "a"]}, "candidates"),
        ("/rank", {"user_id": "u1", "candidates": [f"x{i}" for i in range(MAX_CANDIDATES + 1)]}, "candidates"),
        ("/rank", {"user_id": "u1", "candidates": ["a"], "k": 0}, "k"),
        ("/rank", {"user_id": "u1", "candidates": ["a"], "rules": {"diversity": 2}}, "diversity"),
        ("/rank", {"candidates": ["a"]}, "user_id"),
        ("/events", {"events": [{"user_id": "u1", "item_id": "a", "type": "like"}]}, "type"),
        ("/events", {"events": []}, "events"),
        ("/events", {"events": [{"user_id": "u1", "item_id": "a", "type": "view", "ts": -5}]}, "ts"),
    ],
)
def test_bad_input_gets_422_naming_the_field(service, path, body, field):
    client = service["client"]
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    if field == "json":
        assert detail[0]["type"] == "json_invalid"
    else:
        assert any(field in [str(p) for p in d["loc"]] for d in detail), detail


def test_redis_outage_degrades_rank_and_refuses_events_then_recovers(service):
    dataset, client, redis_server = service["dataset"], service["client"], service["redis"]
    user = user_with_history(dataset)
    cands = candidate_ids(dataset, 20, seed=2) + ["never-seen-item"]
    event = {"events": [{"user_id": user, "item_id": cands[0], "type": "view", "event_id": "outage-1"}]}
    redis_server.stop()
    try:
        ranked = client.post("/rank", json={"user_id": user, "candidates": cands, "k": 21})
        assert ranked.status_code == 200, ranked.text
        out = ranked.json()
        assert out["degraded"] is True
        assert sorted(i["item_id"] for i in out["items"]) == sorted(cands)  # still ranks every candidate
        refused = client.post("/events", json=event)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        health = client.get("/healthz").json()
        assert health["redis"] is False and health["model_loaded"] is True
    finally:
        redis_server.start()
    stored = wait_until(lambda: client.post("/events", json=event).status_code == 200, "events after restart")
    assert stored
    again = client.post("/rank", json={"user_id": user, "candidates": cands, "k": 5}).json()
    assert again["degraded"] is False
    assert client.get("/healthz").json()["status"] == "ok"


def test_concurrent_requests_are_scored_in_batches(service):
    dataset = service["dataset"]
    users = [str(u) for u in dataset.user_ids[1:33]]

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=service["url"], timeout=30) as client:
            bodies = [{"user_id": u, "candidates": candidate_ids(dataset, 25, seed=i), "k": 5}
                      for i, u in enumerate(users)]
            responses = await asyncio.gather(*(client.post("/rank", json=b) for b in bodies))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        return [r.json() for r in responses]

    sizes = [out["scorer_batch_size"] for out in asyncio.run(burst())]
    assert max(sizes) > 1, sizes


def test_hot_swap_to_a_new_version_without_failed_requests(service):
    client, registry = service["client"], service["registry"]
    dataset = service["dataset"]
    before = client.get("/model").json()["version"]
    new = registry.publish_dir(service["model"], {"note": "e2e hot swap", "trained_until": 1234.0})
    assert f"v{new}" != before
    statuses, versions = [], set()

    def swapped() -> bool:
        r = client.post("/rank", json={"user_id": "u-swap", "candidates": candidate_ids(dataset, 10), "k": 3})
        statuses.append(r.status_code)
        if r.status_code == 200:
            versions.add(r.json()["model_version"])
        return r.status_code == 200 and r.json()["model_version"] == f"v{new}"

    wait_until(swapped, f"the scorer to serve v{new}", every_s=0.05)
    assert set(statuses) == {200}
    info = client.get("/model").json()
    assert info["version"] == f"v{new}" and info["trained_until"] == 1234.0
    assert info["meta"]["note"] == "e2e hot swap"

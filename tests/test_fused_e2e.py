"""End to end, layout fused (no Scorer deployment: the ingress replica holds the models and scores
each batch itself): hot swap from the registry, GET /model of the fused replica, an experiment arm
with its own model (scores of that model) and an arm registry it follows, degradation when a
model fails to load or a forward pass takes longer than score_timeout_s, and shedding.

Real Ray Serve and a real Redis; each app is deployed with the settings its test exercises.
That the three layouts rank alike is tests/test_serving_e2e.py; experiments at length (interleaving,
arm trainers, the sink, the simulator) on fused are tests/test_experiments_e2e.py.
"""

from __future__ import annotations

import asyncio
import shutil

import httpx
import numpy as np
import pytest

from online_helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
PREFIX = "fused:"


@pytest.fixture(scope="module")
def shop(tmp_path_factory, redis_server):
    """A small shop, its SASRec (registry v1), a popularity model, an arm registry, and a model
    directory whose weights are garbage (it does not load)."""
    from deployments.app import ensure_loaded
    from rerank.data.dataset import load_dataset
    from rerank.models.registry import ModelRegistry
    from rerank.models.sequential import WEIGHTS_FILE
    from rerank.models.train import train
    from online_helpers import small_shop

    root = tmp_path_factory.mktemp("fused")
    small_shop(root, seed=5)
    train("pop", root / "data", root / "pop", evaluate_valid=False)
    registry = ModelRegistry(str(root / "registry"))
    registry.publish_dir(root / "model", {"note": "fused initial"})
    arm_registry = ModelRegistry(str(root / "arm-registry"))
    arm_registry.publish_dir(root / "model", {"note": "arm initial"})
    shutil.copytree(root / "model", root / "broken")
    (root / "broken" / WEIGHTS_FILE).write_bytes(b"not a torch file")
    redis_server.start()
    ensure_loaded(redis_server.url, str(root / "data"), PREFIX)
    dataset = load_dataset(root / "data")
    return {"root": root, "registry": registry, "arm_registry": arm_registry, "redis_url": redis_server.url,
            "dataset": dataset, "items": [str(i) for i in dataset.item_ids[1:61]]}


@pytest.fixture(scope="module")
def deploy(serve_url, shop):
    """deploy(name, **args) -> an httpx client for a fused app at /name (deleted at the end)."""
    from ray import serve

    from deployments.app import build_app

    names: list[str] = []

    def run(name: str, **args) -> httpx.Client:
        base = {"layout": "fused", "model": str(shop["root"] / "model"), "redis_url": shop["redis_url"],
                "redis_prefix": PREFIX, "catalogue_refresh_s": 0, "ingress_batch_wait_s": 0.02,
                "online": {"enabled": False}, "allow_no_auth": True}
        serve.run(build_app({**base, **args}), name=name, route_prefix=f"/{name}")
        names.append(name)
        return httpx.Client(base_url=f"{serve_url}/{name}", timeout=30)

    yield run
    for name in names:
        serve.delete(name, _blocking=False)


@pytest.fixture(scope="module")
def fused(deploy, shop):
    """The fused app following the registry, with experiments: `ab` (control | the popularity
    model), `follow` (an arm following its own registry) and `broken` (an arm whose model does not
    load)."""
    root = shop["root"]
    experiments = {
        "ab": {"traffic": 0.4, "arms": {"control": {}, "pop": {"model": str(root / "pop")}}},
        "follow": {"traffic": 0.2, "arms": {"own": {"registry_uri": shop["arm_registry"].uri}}},
        "broken": {"traffic": 0.2, "arms": {"bad": {"model": str(root / "broken")}}},
    }
    return deploy("fused-e2e", registry_uri=shop["registry"].uri, registry_poll_s=0.2, experiments=experiments)


def _burst(client: httpx.Client, bodies: list[dict]) -> list[httpx.Response]:
    async def go():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30) as c:
            return await asyncio.gather(*(c.post("/rank", json=b) for b in bodies))
    return asyncio.run(go())


def _by_arm(client: httpx.Client, shop, n_users: int = 120) -> dict[str, list[dict]]:
    """One answer per user fu0..fu{n_users - 1} (with its "user"), by arm."""
    arms: dict[str, list[dict]] = {}
    for u in range(n_users):
        r = client.post("/rank", json={"user_id": f"fu{u}", "candidates": shop["items"], "k": 10,
                                       "rules": {"exclude_purchased": False}})
        assert r.status_code == 200, r.text
        arms.setdefault(r.json()["arm"], []).append({**r.json(), "user": f"fu{u}"})
    return arms


def test_the_app_has_no_scorer_and_model_reports_the_fused_replica(fused, shop):
    from ray import serve

    status = serve.status().applications["fused-e2e"]
    assert set(status.deployments) == {"Ingress"}  # no Scorer, no hop
    info = fused.get("/model").json()
    assert info["version"] == "v1" and info["meta"]["note"] == "fused initial" and info["kind"] == "sasrec"
    health = fused.get("/healthz").json()
    assert health["model_loaded"] is True and health["model_version"] == "v1" and health["status"] == "ok"


def test_an_arm_with_its_own_model_is_scored_by_that_model(fused, shop):
    from rerank.models.recommender import load_model
    from rerank.store.feature_store import FeatureStore

    arms = _by_arm(fused, shop)
    assert arms.get("pop") and arms.get("control") and arms.get("default") and arms.get("own")
    assert {a["model_version"] for a in arms["pop"]} == {"dir:pop"}
    assert {a["model_version"] for a in arms["control"] + arms["default"] + arms["own"]} == {"v1"}
    assert not any(a["degraded"] for arm in ("pop", "control", "default", "own") for a in arms[arm])
    pop = load_model(shop["root"] / "pop")
    store = FeatureStore(shop["redis_url"], prefix=PREFIX)
    for answer in arms["pop"][:5]:  # the popularity model's own scores (ties in any order)
        features = store.fetch([(answer["user"], shop["items"])], history_len=50)[0]
        expected = pop.score([features.history], features.candidates[None, :].astype(np.int64),
                             [features.history_types])[0]
        by_id = dict(zip(shop["items"], expected.tolist()))
        got = [i["score"] for i in answer["items"]]
        np.testing.assert_allclose(got, [by_id[i["item_id"]] for i in answer["items"]], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got, np.sort(expected)[::-1][:10], rtol=1e-4, atol=1e-5)  # its top 10


def test_a_model_that_does_not_load_gives_degraded_answers_not_errors(fused, shop):
    arms = _by_arm(fused, shop)
    bad = arms.get("bad")
    assert bad, "no user in the broken arm"
    for answer in bad:  # the first load fails, the next requests fail fast: all answered
        assert answer["degraded"] is True and len(answer["items"]) == 10
        assert {i["item_id"] for i in answer["items"]} <= set(shop["items"])
    assert not any(a["degraded"] for arm, answers in arms.items() if arm != "bad" for a in answers)
    assert fused.get("/healthz").json()["status"] == "ok"


def test_hot_swap_of_the_app_and_of_an_arm_registry_without_failed_requests(fused, shop):
    arms = _by_arm(fused, shop, n_users=60)
    default_user, follower = arms["default"][0]["user"], arms["own"][0]["user"]
    new = shop["registry"].publish_dir(shop["root"] / "model", {"note": "fused hot swap", "trained_until": 4321.0})
    arm_new = shop["arm_registry"].publish_dir(shop["root"] / "model", {"note": "arm hot swap"})
    statuses = []

    def serves(user: str, version: str):
        def check() -> bool:
            r = fused.post("/rank", json={"user_id": user, "candidates": shop["items"][:10], "k": 3})
            statuses.append(r.status_code)
            return r.status_code == 200 and r.json()["model_version"] == version
        return check

    wait_until(serves(default_user, f"v{new}"), f"the fused replica to serve v{new}", timeout_s=60, every_s=0.05)
    info = fused.get("/model").json()
    assert info["version"] == f"v{new}" and info["trained_until"] == 4321.0 and info["meta"]["note"] == "fused hot swap"
    wait_until(serves(follower, f"v{arm_new}"), f"the arm to serve its registry's v{arm_new}", timeout_s=60)
    assert set(statuses) == {200}


def test_a_forward_pass_over_score_timeout_gives_a_degraded_ranking(deploy, shop):
    client = deploy("fused-slow", score_timeout_s=1e-6)  # every forward pass is too slow
    body = {"user_id": str(shop["dataset"].user_ids[1]), "candidates": shop["items"][:30], "k": 10}
    responses = _burst(client, [body] * 8)
    assert [r.status_code for r in responses] == [200] * 8
    for r in responses:
        out = r.json()
        assert out["degraded"] is True and len(out["items"]) == 10
        assert {i["item_id"] for i in out["items"]} <= set(shop["items"][:30])


def test_overload_answers_503_with_retry_after_at_once(deploy, shop):
    client = deploy("fused-shed", max_in_flight=2, ingress_batch_wait_s=0.2)
    body = {"user_id": str(shop["dataset"].user_ids[1]), "candidates": shop["items"][:30], "k": 3}
    statuses = [r.status_code for r in _burst(client, [body] * 24)]
    shed = [r for r in _burst(client, [body] * 24) if r.status_code == 503]
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
    assert shed and all(int(r.headers["retry-after"]) >= 1 for r in shed)

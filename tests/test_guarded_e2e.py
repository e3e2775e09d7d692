"""Exposed means hostile: keys and scopes, one bad request never fails its batch, overload
answers 503 at once, a failed scorer degrades instead of failing, big bodies get 413.

Real Ray Serve and a real Redis; each case deploys the app with the setting it exercises.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from online_helpers import tiny_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
PREFIX = "guard:"
RANK_KEY, ADMIN_KEY = "rank-key-0123456789abcdef", "admin-key-0123456789abcdef"


@pytest.fixture(scope="module")
def shop(tmp_path_factory, redis_server):
    from deployments.app import ensure_loaded
    from rerank.data.dataset import load_dataset

    data, model = tiny_model_dir(tmp_path_factory.mktemp("guarded"))
    redis_server.start()
    ensure_loaded(redis_server.url, str(data), PREFIX)
    dataset = load_dataset(data)
    return {"data": data, "model": model, "redis_url": redis_server.url,
            "items": [str(i) for i in dataset.item_ids[1:31]], "user": str(dataset.user_ids[1])}


@pytest.fixture(scope="module")
def deploy(serve_url, shop):
    """deploy(name, **args) -> an httpx client for the app at /name (deleted at the end)."""
    from ray import serve

    from deployments.app import build_app

    names: list[str] = []

    def run(name: str, **args) -> httpx.Client:
        base = {"model": str(shop["model"]), "redis_url": shop["redis_url"], "redis_prefix": PREFIX,
                "catalogue_refresh_s": 0, "ingress_batch_wait_s": 0.02, "online": {"enabled": False},
                "allow_no_auth": True}  # no effect where a case gives api_keys
        serve.run(build_app({**base, **args}), name=name, route_prefix=f"/{name}")
        names.append(name)
        return httpx.Client(base_url=f"{serve_url}/{name}", timeout=30)

    yield run
    for name in names:
        serve.delete(name, _blocking=False)


def _burst(client: httpx.Client, bodies: list[dict], headers: dict | None = None) -> list[httpx.Response]:
    async def go():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30, headers=headers) as c:
            return await asyncio.gather(*(c.post("/rank", json=b) for b in bodies))
    return asyncio.run(go())


def test_keys_and_scopes_guard_every_route_but_health(deploy, shop):
    client = deploy("keyed", api_keys={"shop": {"key": RANK_KEY, "scopes": ["rank", "events"]},
                                       "ops": {"key": ADMIN_KEY, "scopes": ["rank", "events", "admin"]}})
    body = {"user_id": shop["user"], "candidates": shop["items"], "k": 3}
    shop_key, ops_key = {"Authorization": f"Bearer {RANK_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}"}
    missing = client.post("/rank", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    wrong = client.post("/rank", json=body, headers={"Authorization": "Bearer not-a-key-0123456789abcdef"})
    assert wrong.status_code == 401 and "not-a-key" not in wrong.text  # the key is never echoed
    assert client.post("/rank", json=body, headers=shop_key).status_code == 200
    event = {"events": [{"user_id": "u-k", "item_id": shop["items"][0], "type": "view", "event_id": "k-1"}]}
    assert client.post("/events", json=event).status_code == 401
    assert client.post("/events", json=event, headers=shop_key).json() == {"accepted": 1, "duplicates": 0}
    assert client.get("/model").status_code == 401 and client.get("/model", headers=shop_key).status_code == 200
    denied = client.post("/admin/rollback", json={"unpin": True}, headers=shop_key)
    assert denied.status_code == 403 and "admin" in denied.text
    assert client.post("/admin/rollback", json={"unpin": True}, headers=ops_key).status_code == 409  # no registry
    assert client.get("/healthz").status_code == 200  # probes need no key


def test_a_non_finite_boost_fails_only_its_own_request_in_a_batch(deploy, shop):
    client = deploy("isolated")
    good = {"user_id": shop["user"], "candidates": shop["items"], "k": 5}
    bad = {**good, "rules": {"boost": {shop["items"][0]: "NaN"}}}
    raw = '{"user_id": "%s", "candidates": %s, "k": 5, "rules": {"boost": {"%s": 1e309}}}' % (
        shop["user"], str(shop["items"]).replace("'", '"'), shop["items"][1])

    async def go():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30) as c:
            calls = [c.post("/rank", json=good) for _ in range(15)] + [c.post("/rank", json=bad)]
            calls.append(c.post("/rank", content=raw, headers={"content-type": "application/json"}))
            return await asyncio.gather(*calls)

    responses = asyncio.run(go())
    assert [r.status_code for r in responses[:15]] == [200] * 15
    assert responses[15].status_code == responses[16].status_code == 422
    assert "boost" in responses[16].text
    big_negative = {**good, "rules": {"boost": {shop["items"][2]: -1000.0}, "diversity": 0.5}}
    ids = [i["item_id"] for i in client.post("/rank", json=big_negative).json()["items"]]
    assert len(ids) == len(set(ids)) == 5  # never the same item twice


def test_overload_answers_503_with_retry_after_at_once(deploy, shop):
    client = deploy("shedding", max_in_flight=2, ingress_batch_wait_s=0.2)
    body = {"user_id": shop["user"], "candidates": shop["items"], "k": 3}
    statuses = [r.status_code for r in _burst(client, [body] * 24)]
    shed = [r for r in _burst(client, [body] * 24) if r.status_code == 503]
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
    assert shed and all(int(r.headers["retry-after"]) >= 1 for r in shed)


def test_a_failing_scorer_gives_a_degraded_ranking_not_an_error(deploy, shop):
    client = deploy("noscorer", score_timeout_s=1e-6)  # every scorer call times out
    body = {"user_id": shop["user"], "candidates": shop["items"], "k": 10}
    responses = _burst(client, [body] * 8)
    assert [r.status_code for r in responses] == [200] * 8
    for r in responses:
        out = r.json()
        assert out["degraded"] is True and len(out["items"]) == 10
        assert {i["item_id"] for i in out["items"]} <= set(shop["items"])


def test_oversized_bodies_and_whole_catalogue_over_the_cap_are_refused(deploy, shop):
    from rerank.serving.api import MAX_BODY_BYTES

    client = deploy("bounded", max_catalogue_items=10)
    huge = b'{"user_id": "u", "candidates": ["' + b"x" * (MAX_BODY_BYTES + 10) + b'"]}'
    too_big = client.post("/rank", content=huge, headers={"content-type": "application/json"})
    assert too_big.status_code == 413
    whole = client.post("/rank", json={"user_id": shop["user"], "k": 5})  # 60 items > cap 10
    assert whole.status_code == 422 and "candidates" in whole.text


def test_new_items_from_events_stop_at_the_allowance(deploy, shop):
    import redis

    client = deploy("allowance", new_item_allowance=5)
    events = [{"user_id": "u-new", "item_id": f"brand-new-{n}", "type": "view", "event_id": f"new-{n}"}
              for n in range(20)]
    stored = client.post("/events", json={"events": events})
    assert stored.status_code == 200 and stored.json() == {"accepted": 20, "duplicates": 0}  # nothing lost
    known = redis.Redis.from_url(shop["redis_url"]).hkeys(f"{PREFIX}item_idx")
    assert len([k for k in known if k.startswith(b"brand-new-")]) == 5  # the catalogue grew by the allowance only

"""The ingress' key gate over real Ray Serve and a real Redis: an unauthenticated body is refused
before it is read or parsed (and how long that takes), per-key rate limits (429 + Retry-After),
keys bound to a tenant, the API docs behind the admin key, and a build without keys refused
unless allow_no_auth (then /healthz says auth is off)."""

from __future__ import annotations

import json
import statistics
import time
import uuid

import httpx
import pytest

from online_helpers import tiny_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
PREFIX = "authe2e:"
SHOP_KEY, TENANT_KEY = "shop-key-0123456789abcdef", "tenant-key-0123456789abcdef"
SLOW_KEY, ADMIN_KEY = "slow-key-0123456789abcdef", "admin-key-0123456789abcdef"
KEYS = {"shop": {"key": SHOP_KEY, "scopes": ["rank", "events"]},
        "tenant": {"key": TENANT_KEY, "scopes": ["rank", "events"], "user_prefix": "t1-"},
        "slow": {"key": SLOW_KEY, "scopes": ["rank"], "rate_per_s": 0.5, "burst": 2},
        "ops": {"key": ADMIN_KEY, "scopes": ["rank", "events", "admin"]}}
# ~1 MiB of /rank body (just under the 1 MiB limit): 65,000 candidate ids to parse and validate, the
# last one empty (invalid): parsed before the key check, it got a 422 describing the schema
BIG_BODY = json.dumps({"user_id": "u1", "candidates": [f"item-{i:07d}" for i in range(65_000)] + [""]}).encode()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def shop(tmp_path_factory, redis_server):
    from deployments.app import ensure_loaded
    from rerank.data.dataset import load_dataset

    data, model = tiny_model_dir(tmp_path_factory.mktemp("authe2e"))
    redis_server.start()
    ensure_loaded(redis_server.url, str(data), PREFIX)
    return {"model": model, "redis_url": redis_server.url,
            "items": [str(i) for i in load_dataset(data).item_ids[1:21]]}


@pytest.fixture(scope="module")
def deploy(serve_url, shop):
    from ray import serve

    from deployments.app import build_app

    names: list[str] = []

    def run(name: str, **args) -> httpx.Client:
        base = {"model": str(shop["model"]), "redis_url": shop["redis_url"], "redis_prefix": PREFIX,
                "catalogue_refresh_s": 0, "online": {"enabled": False}}
        serve.run(build_app({**base, **args}), name=name, route_prefix=f"/{name}")
        names.append(name)
        return httpx.Client(base_url=f"{serve_url}/{name}", timeout=30)

    yield run
    for name in names:
        serve.delete(name, _blocking=False)


@pytest.fixture(scope="module")
def keyed(deploy):
    return deploy("gate", api_keys=KEYS)


def test_a_keyless_big_body_is_refused_before_it_is_parsed(keyed):
    headers = {"content-type": "application/json"}
    keyless = keyed.post("/rank", content=BIG_BODY, headers=headers)
    assert keyless.status_code == 401, keyless.text[:300]  # before: 422 describing the schema
    assert keyless.headers["www-authenticate"] == "Bearer" and "candidates" not in keyless.text
    wrong = keyed.post("/rank", content=BIG_BODY, headers={**headers, **auth("x" * 30)})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    times = []
    for _ in range(10):
        started = time.perf_counter()
        assert keyed.post("/rank", content=BIG_BODY, headers=headers).status_code == 401
        times.append((time.perf_counter() - started) * 1000)
    print(f"keyless 1 MiB /rank: median {statistics.median(times):.1f} ms, max {max(times):.1f} ms")
    # with the key the body is parsed and validated as before: 422 naming the bad candidate
    invalid = keyed.post("/rank", content=BIG_BODY, headers={**headers, **auth(SHOP_KEY)})
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"][:2] == ["body", "candidates"]


def test_a_key_over_its_rate_gets_429_with_retry_after(keyed, shop):
    body = {"user_id": "u-slow", "candidates": shop["items"], "k": 3}
    statuses = [keyed.post("/rank", json=body, headers=auth(SLOW_KEY)) for _ in range(4)]
    assert [r.status_code for r in statuses[:2]] == [200, 200]  # the burst
    refused = [r for r in statuses[2:] if r.status_code == 429]
    assert refused, [r.status_code for r in statuses]
    assert all(1 <= int(r.headers["retry-after"]) <= 2 for r in refused)
    assert "rate limit" in refused[0].json()["detail"] and SLOW_KEY not in refused[0].text
    assert keyed.post("/rank", json=body, headers=auth(SHOP_KEY)).status_code == 200  # other keys unaffected
    time.sleep(float(refused[-1].headers["retry-after"]))
    assert keyed.post("/rank", json=body, headers=auth(SLOW_KEY)).status_code == 200


def test_a_tenants_key_ranks_and_writes_only_its_own_users(keyed, shop):
    from rerank.store.feature_store import FeatureStore

    mine, theirs = f"t1-{uuid.uuid4().hex[:8]}", f"t2-{uuid.uuid4().hex[:8]}"
    body = {"candidates": shop["items"], "k": 3}
    assert keyed.post("/rank", json={**body, "user_id": mine}, headers=auth(TENANT_KEY)).status_code == 200
    other = keyed.post("/rank", json={**body, "user_id": theirs}, headers=auth(TENANT_KEY))
    assert other.status_code == 403 and "tenant" in other.json()["detail"] and "t1-" not in other.text
    events = [{"user_id": mine, "item_id": shop["items"][0], "type": "click"},
              {"user_id": theirs, "item_id": shop["items"][1], "type": "click"}]
    refused = keyed.post("/events", json={"events": events}, headers=auth(TENANT_KEY))
    assert refused.status_code == 403 and refused.json()["detail"].startswith("events[1]: ")
    store = FeatureStore(shop["redis_url"], prefix=PREFIX)
    assert store.fetch([(mine, None)])[0].history.size == 0  # refused before anything was written
    ok = keyed.post("/events", json={"events": events[:1]}, headers=auth(TENANT_KEY))
    assert ok.json() == {"accepted": 1, "duplicates": 0}
    assert store.fetch([(mine, None)])[0].history.size == 1
    # a key without a tenant names any user
    assert keyed.post("/rank", json={**body, "user_id": theirs}, headers=auth(SHOP_KEY)).status_code == 200


def test_the_api_docs_need_the_admin_key(keyed):
    assert keyed.get("/openapi.json").status_code == 401
    assert keyed.get("/docs", headers=auth(SHOP_KEY)).status_code == 403
    doc = keyed.get("/openapi.json", headers=auth(ADMIN_KEY))
    assert doc.status_code == 200 and "/rank" in doc.json()["paths"]
    assert "429" in doc.json()["paths"]["/rank"]["post"]["responses"]
    assert keyed.get("/healthz").json()["auth"] == "on"  # probes still need no key


def test_a_build_without_keys_is_refused_unless_allow_no_auth(deploy, shop, monkeypatch):
    from deployments.app import build_app

    for var in ("RERANK_API_KEY", "RERANK_ADMIN_KEY", "RERANK_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError) as refused:
        build_app({"model": str(shop["model"]), "redis_url": shop["redis_url"], "redis_prefix": PREFIX,
                   "online": {"enabled": False}})
    assert "RERANK_API_KEY" in str(refused.value) and "allow_no_auth: true" in str(refused.value)
    open_app = deploy("open", allow_no_auth=True)
    assert open_app.get("/healthz").json()["auth"] == "off"
    assert open_app.get("/openapi.json").status_code == 200  # local use: docs open

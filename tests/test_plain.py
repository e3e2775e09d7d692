"""The plain reference (rerank.serving.plain) without Ray: a real Redis, a trained model, real HTTP.

Checks that it answers /rank in the service's response shape with the model's own order of the
candidates, records the impression, applies the service's limits and keys, and runs as the
child process the bench starts. tests/test_plain_e2e.py checks it against the Serve app.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

PREFIX = "plain:"


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    from online_helpers import small_shop

    from rerank.data.dataset import load_dataset

    root = tmp_path_factory.mktemp("plain")
    data, model = small_shop(root, seed=5)
    return {"data": data, "model": model, "dataset": load_dataset(data)}


@pytest.fixture
def loaded(redis_url, shop):
    """The shop bulk-loaded into an empty Redis under PREFIX."""
    from rerank.store.feature_store import FeatureStore

    store = FeatureStore(redis_url, prefix=PREFIX)
    store.bulk_load(shop["dataset"], progress=False)
    store.close()
    return {**shop, "redis_url": redis_url}


def settings(loaded, **overrides):
    from rerank.serving.plain import PlainSettings

    return PlainSettings(redis_url=loaded["redis_url"], model=str(loaded["model"]), redis_prefix=PREFIX,
                         catalogue_refresh_s=0, **overrides)


def user_with_history(dataset, min_events: int = 8) -> str:
    return next(str(dataset.user_ids[u]) for u in range(1, dataset.n_users + 1)
                if len(dataset.sequences[u]) >= min_events)


def candidates(dataset, n: int, seed: int = 0) -> list[str]:
    picks = np.random.default_rng(seed).choice(np.arange(1, dataset.n_items + 1), size=n, replace=False)
    return [str(dataset.item_ids[i]) for i in picks]


def test_rank_is_the_model_order_in_the_services_shape(loaded, monkeypatch):
    from rerank.models.recommender import load_model
    from rerank.serving.api import RankResponse
    from rerank.serving.plain import build_plain_app
    from rerank.store.feature_store import FeatureStore

    monkeypatch.delenv("RERANK_API_KEY", raising=False)
    dataset = loaded["dataset"]
    user, cands = user_with_history(dataset), candidates(dataset, 30)
    with TestClient(build_plain_app(settings(loaded))) as client:
        r = client.post("/rank", json={"user_id": user, "candidates": cands, "k": 30,
                                       "rules": {"exclude_purchased": False}})
        assert r.status_code == 200, r.text
        out = RankResponse.model_validate(r.json())  # the service's response model
        assert client.get("/healthz").json()["redis"] is True
    assert out.model_version == f"dir:{loaded['model'].name}" and out.degraded is False
    assert out.experiment == "" and out.arm == "default" and out.scorer_batch_size == 1
    returned = [i.item_id for i in out.items]
    assert sorted(returned) == sorted(cands)
    features = FeatureStore(loaded["redis_url"], prefix=PREFIX).fetch([(user, cands)], history_len=50)[0]
    expected = load_model(loaded["model"]).score([features.history], features.candidates[None, :].astype(np.int64),
                                                 [features.history_types])[0]
    by_id = dict(zip(cands, expected.tolist()))
    np.testing.assert_allclose([i.score for i in out.items], [by_id[i] for i in returned], rtol=1e-4, atol=1e-5)
    assert returned[:5] == [cands[i] for i in np.argsort(-expected, kind="stable")[:5]]
    # the impression, as the ingress writes it
    stream = redis.Redis.from_url(loaded["redis_url"]).xrange(f"{PREFIX}impressions")
    assert len(stream) == 1 and stream[0][1][b"request_id"].decode() == out.request_id


def test_limits_keys_and_validation_are_the_services(loaded, monkeypatch):
    from rerank.serving.plain import build_plain_app

    monkeypatch.setenv("RERANK_API_KEY", "k-plain-0123456789abcdef")
    dataset = loaded["dataset"]
    with TestClient(build_plain_app(settings(loaded, max_candidates=5, record_impressions=False))) as client:
        body = {"user_id": "nobody", "candidates": candidates(dataset, 3)}
        assert client.post("/rank", json=body).status_code == 401
        key = {"Authorization": "Bearer k-plain-0123456789abcdef"}
        r = client.post("/rank", json=body, headers=key)
        assert r.status_code == 200 and len(r.json()["items"]) == 3  # unknown user: cold start
        r = client.post("/rank", json={**body, "candidates": candidates(dataset, 6)}, headers=key)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "candidates"]
        assert client.post("/rank", json={**body, "canditates": []}, headers=key).status_code == 422
    assert redis.Redis.from_url(loaded["redis_url"]).xlen(f"{PREFIX}impressions") == 0  # record_impressions off


def test_settings_from_the_apps_args():
    from rerank.serving.plain import PlainSettings

    s = PlainSettings.from_app_args({"redis_url": "redis://x", "model": "m", "redis_prefix": "p:", "layout": "inline",
                                     "history_len": 20, "online": {"enabled": False}})
    assert (s.redis_url, s.model, s.redis_prefix, s.history_len) == ("redis://x", "m", "p:", 20)
    assert s.extra == {"layout": "inline", "online": {"enabled": False}}


def test_plain_server_runs_as_a_child_process(loaded, tmp_path, monkeypatch):
    from rerank.clients.bench import CpuMeter
    from rerank.serving.plain import PlainServer

    monkeypatch.delenv("RERANK_API_KEY", raising=False)
    dataset = loaded["dataset"]
    server = PlainServer(settings(loaded), log=tmp_path / "plain.log").start()
    try:
        meter = CpuMeter(names={server.pid: "plain"})
        before = meter.snapshot()
        body = {"user_id": user_with_history(dataset), "candidates": candidates(dataset, 20), "k": 5}
        for _ in range(5):
            r = httpx.post(f"{server.url}/rank", json=body, timeout=30)
            assert r.status_code == 200, r.text
        assert len(r.json()["items"]) == 5
        assert meter.used_by_process(before)["plain"] > 0
    finally:
        pid = server.pid
        server.stop()
    assert server.pid is None
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

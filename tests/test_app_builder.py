"""deployments.app.ensure_loaded against a real Redis: load once, keep online state, refuse a foreign catalogue."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="module")
def shops(tmp_path_factory):
    from rerank.data.synth import SynthConfig, write_synth

    root = tmp_path_factory.mktemp("shops")
    write_synth(root / "small", SynthConfig(n_users=50, n_items=120, seed=1))  # ids sku001..
    write_synth(root / "large", SynthConfig(n_users=50, n_items=1200, seed=1))  # ids sku0001..
    return root


def test_ensure_loaded_loads_once_and_keeps_online_events(redis_server, shops):
    from deployments.app import ensure_loaded
    from rerank.store.events import Event
    from rerank.store.feature_store import FeatureStore

    redis_server.start()
    prefix = f"t{uuid.uuid4().hex[:8]}:"  # no flush: other modules share the server
    assert ensure_loaded(redis_server.url, str(shops / "small"), prefix) is not None
    store = FeatureStore(redis_server.url, prefix=prefix)
    store.write_events([Event("new-user", "sku001", "purchase", event_id=f"{prefix}e1")])
    assert ensure_loaded(redis_server.url, str(shops / "small"), prefix) is None  # already loaded: kept
    features = store.fetch([("new-user", ["sku001"])])[0]
    assert features.purchased.tolist() == [1]  # the online event survived the second call


def test_ensure_loaded_refuses_a_store_holding_another_catalogue(redis_server, shops):
    from deployments.app import ensure_loaded

    redis_server.start()
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    ensure_loaded(redis_server.url, str(shops / "small"), prefix)
    with pytest.raises(ValueError, match="another catalogue"):
        ensure_loaded(redis_server.url, str(shops / "large"), prefix)

"""deployments.app against a real Redis: ensure_loaded (load once, keep online state, refuse a foreign
catalogue); the layout default by the scorers' GPUs and the deployments each layout builds."""

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


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from online_helpers import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("builder"))[1]


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


def test_the_layout_defaults_to_fused_without_scorer_gpus_and_inline_with():
    from pydantic import ValidationError

    from deployments.app import AppArgs, default_layout

    base = {"model": "m", "online": {"enabled": False}}
    assert AppArgs.model_validate(base).layout == "fused"
    assert AppArgs.model_validate({**base, "layout": None, "scorer_num_gpus": 0}).layout == "fused"
    assert AppArgs.model_validate({**base, "scorer_num_gpus": 1}).layout == "inline"
    assert AppArgs.model_validate({**base, "scorer_num_gpus": 0.5, "layout": "split"}).layout == "split"
    assert AppArgs.model_validate({**base, "layout": "inline"}).layout == "inline"  # asked for: kept
    assert (default_layout(0), default_layout(0.25)) == ("fused", "inline")
    with pytest.raises(ValidationError, match="layout fused scores in the ingress replica"):
        AppArgs.model_validate({**base, "layout": "fused", "scorer_num_gpus": 1})
    with pytest.raises(ValidationError, match="layout"):
        AppArgs.model_validate({**base, "layout": "fuzed"})


@pytest.mark.parametrize(("layout", "deployments"), [
    ("fused", {"Ingress"}),
    ("inline", {"Ingress", "Scorer"}),
    ("split", {"Ingress", "Scorer", "FeatureFetch", "Ranker"}),
])
def test_each_layout_builds_its_deployments_and_fused_has_no_scorer(redis_server, tiny_model, layout, deployments):
    from ray.serve._private.build_app import build_app as built

    from deployments.app import build_app

    redis_server.start()
    app = build_app({"model": str(tiny_model), "redis_url": redis_server.url, "layout": layout,
                     "redis_prefix": f"t{uuid.uuid4().hex[:8]}:", "online": {"enabled": False},
                     "allow_no_auth": True})
    assert {d.name for d in built(app, name="builder-test").deployments} == deployments

"""The plain reference against the Serve app: the same rankings for the same requests.

`rerank bench` relates the service's numbers to `plain` (rerank.serving.plain: the same Ray-free
core in one uvicorn process, no Ray); that comparison means something only if both do the same
work. Here both serve one trained model over one real Redis, and every request gets the same
items in the same order with the same scores from each.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PREFIX = "plain-e2e:"
APP = "rerank-plain-e2e"
LAYOUTS = ("inline", "fused")  # one Serve hop per batch to the Scorer, and none (the model in the ingress)


@pytest.fixture(scope="module")
def both(serve_url, redis_server, tmp_path_factory):
    """The app on Serve in each layout at /plain-e2e-LAYOUT and the plain server (a child process),
    same Redis and model."""
    from ray import serve

    from deployments.app import build_app, ensure_loaded
    from online_helpers import small_shop
    from rerank.data.dataset import load_dataset
    from rerank.serving.plain import PlainServer, PlainSettings

    root = tmp_path_factory.mktemp("plain-e2e")
    data, model = small_shop(root, seed=7)
    redis_server.start()
    ensure_loaded(redis_server.url, str(data), PREFIX)
    args = {"model": str(model), "redis_url": redis_server.url, "redis_prefix": PREFIX, "catalogue_refresh_s": 0,
            "online": {"enabled": False}, "allow_no_auth": True}
    for layout in LAYOUTS:
        serve.run(build_app({**args, "layout": layout}), name=f"{APP}-{layout}", route_prefix=f"/plain-e2e-{layout}")
    plain = PlainServer(PlainSettings.from_app_args(args), log=root / "plain.log").start()
    yield {**{layout: f"{serve_url}/plain-e2e-{layout}" for layout in LAYOUTS}, "plain": plain.url,
           "dataset": load_dataset(data)}
    plain.stop()
    for layout in LAYOUTS:
        serve.delete(f"{APP}-{layout}", _blocking=False)


def bodies(dataset) -> list[dict]:
    rng = np.random.default_rng(11)
    users = [str(dataset.user_ids[u]) for u in range(1, dataset.n_users + 1) if len(dataset.sequences[u]) >= 5][:4]
    out = []
    for i, user in enumerate(users + ["plain-e2e-unknown-user"]):
        picks = rng.choice(np.arange(1, dataset.n_items + 1), size=40, replace=False)
        cands = [str(dataset.item_ids[j]) for j in picks]
        rules = [{}, {"diversity": 0.3}, {"exclude": cands[:3], "boost": {cands[5]: 2.0}},
                 {"exclude_purchased": False}, {}][i]
        out.append({"user_id": user, "candidates": cands + ["never-seen-item"], "k": 15, "rules": rules})
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plain_and_serve_answer_the_same_rankings(both, layout):
    for body in bodies(both["dataset"]):
        answers = {}
        for name in (layout, "plain"):
            r = httpx.post(f"{both[name]}/rank", json=body, timeout=30)
            assert r.status_code == 200, (name, r.text)
            answers[name] = r.json()
        served, plain = answers[layout], answers["plain"]
        assert [i["item_id"] for i in plain["items"]] == [i["item_id"] for i in served["items"]], body["rules"]
        np.testing.assert_allclose([i["score"] for i in plain["items"]], [i["score"] for i in served["items"]],
                                   rtol=1e-4, atol=1e-5)
        for key in ("model_version", "degraded", "experiment", "arm"):
            assert plain[key] == served[key], key
        assert set(plain["timings_ms"]) == set(served["timings_ms"]) and plain.keys() == served.keys()

"""The deployed app as a user deploys it, each in its own Ray cluster (a subprocess):

- on a real two-node Ray cluster (tests/multinode_app.py): replicas on a node other than the
  builder's find their model in the registry themselves; rank, events, trainer publish, hot swap;
- `serve run serve_config.yaml` (the shipped config with test paths and a non-default prefix):
  an event posted over HTTP reaches a new model version served by the scorers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from online_helpers import tiny_model_dir, wait_until  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("deploy-e2e"))


def test_multi_node_cluster_serves_trains_and_hot_swaps(redis_url, tiny, tmp_path):
    from rerank.models.registry import ModelRegistry

    registry = ModelRegistry(str(tmp_path / "registry"))
    registry.publish_dir(tiny[1])
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_app.py"), "--registry", registry.uri, "--data", str(tiny[0]),
         "--redis-url", redis_url, "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=480, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    worker = out["worker_node"]
    assert set(out["replica_nodes"]) == {f"ServeReplica:multinode:{d}" for d in ("Ingress", "Scorer", "OnlineTrainer")}
    assert set(out["replica_nodes"].values()) == {worker} != {out["head_node"]}
    assert out["rank_status"] == 200 and out["first_version"] == "v1"
    assert out["events"] == {"sent": 300, "accepted": 300, "errors": 0}
    assert out["swapped_to"] not in (None, "v1")  # the trainer published and the scorer swapped
    assert out["health"]["trainer"]["state"] == "training" and out["health"]["status"] == "ok"
    assert out["model"]["meta"]["events_applied"] > 0


def test_serve_run_of_the_shipped_config_trains_on_posted_events(redis_url, tiny, tmp_path):
    import redis

    from deployments.local import ServeRun, write_serve_config
    from rerank.data.dataset import load_dataset
    from rerank.infra.child_process import free_port

    port = free_port()
    # serve_config.yaml as shipped, with this test's data, model, Redis, registry, prefix and port
    config = write_serve_config(tmp_path / "serve_config.yaml", {
        "model": str(tiny[1]), "data": str(tiny[0]), "redis_url": redis_url, "redis_prefix": "served:",
        "registry_uri": str(tmp_path / "registry"), "registry_poll_s": 0.2, "online": {"publish_every_s": 0.3},
        "sink": {"enabled": True, "out_dir": str(tmp_path / "sink")}},
        port=port)
    served_app = ServeRun(config, log=tmp_path / "serve-run.log")
    base = f"http://127.0.0.1:{port}"
    dataset = load_dataset(tiny[0])
    user, items = str(dataset.user_ids[2]), [str(i) for i in dataset.item_ids[1:21]]
    try:
        served_app.wait_ready(base)
        with httpx.Client(base_url=base, timeout=10) as client:
            first = client.post("/rank", json={"user_id": user, "candidates": items, "k": 5}).json()
            assert first["model_version"] == "v1"
            events = [{"event_id": f"served-{n}", "user_id": user, "item_id": items[n % 20], "type": "click"}
                      for n in range(30)]
            assert client.post("/events", json={"events": events}).json() == {"accepted": 30, "duplicates": 0}
            # the trainer may publish a version holding the first of the 30 entries before it has read
            # the rest (the script runs once per event): wait for the version that holds all of them
            deadline, served, info = time.monotonic() + 60, first["model_version"], {}
            while time.monotonic() < deadline and (served == "v1" or (info.get("meta") or {}).get("events_applied", 0) < 30):
                served = client.post("/rank", json={"user_id": user, "candidates": items, "k": 5}).json()["model_version"]
                info = client.get("/model").json()
                time.sleep(0.2)
            assert served != "v1", "no new version reached the scorers"
            assert info["meta"]["events_applied"] >= 30
            # the shipped config's sink persists the answers and the events to Parquet, attributed
            from rerank.experiments.readout import load_parquet

            def sunk():
                impressions, sunk_events = load_parquet(tmp_path / "sink")
                return sunk_events.num_rows >= 30 and impressions.num_rows >= 2 and (impressions, sunk_events)

            impressions, sunk_events = wait_until(sunk, "the sink to write impressions and events", timeout_s=60)
            assert first["request_id"] in impressions["request_id"].to_pylist()
            shown = {item["item_id"] for item in first["items"]}
            for item_id, how in zip(sunk_events["item_id"].to_pylist(), sunk_events["attributed"].to_pylist()):
                assert how == ("window" if item_id in shown else "")  # clicks on what the first answer showed
        stream = redis.Redis.from_url(redis_url)
        assert stream.xlen("served:events") == 30 and not stream.exists("rr:events")  # keys follow the prefix
        assert stream.exists("served:trainer:lease")
    finally:
        served_app.stop()

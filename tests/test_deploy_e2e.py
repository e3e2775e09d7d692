"""The deployed app as a user deploys it, each in its own Ray cluster (a subprocess):

- on a real two-node Ray cluster (tests/multinode_app.py): replicas on a node other than the
  builder's find their model in the registry themselves; rank, events, trainer publish, hot swap;
- `serve run serve_config.yaml` (the shipped config with test paths and a non-default prefix):
  an event posted over HTTP reaches a new model version served by the scorers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from online_helpers import tiny_model_dir  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("deploy-e2e"))


def test_multi_node_cluster_serves_trains_and_hot_swaps(redis_url, tiny, tmp_path):
    from rerank.registry import ModelRegistry

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


def _serve_config(tmp_path: Path, tiny, redis_url: str, port: int) -> Path:
    """serve_config.yaml as shipped, with this test's data, model, Redis, registry, prefix and port."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    app = next(a for a in config["applications"] if a["import_path"] == "deployments.app:build_app")
    app["args"].update({"model": str(tiny[1]), "data": str(tiny[0]), "redis_url": redis_url,
                        "redis_prefix": "served:", "registry_uri": str(tmp_path / "registry"),
                        "registry_poll_s": 0.2})
    app["args"]["online"]["publish_every_s"] = 0.3
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_serve_run_of_the_shipped_config_trains_on_posted_events(redis_url, tiny, tmp_path):
    import redis

    from rerank.dataset import load_dataset
    from rerank.redis_server import free_port

    port = free_port()
    config = _serve_config(tmp_path, tiny, redis_url, port)
    env = {**os.environ, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    serve_bin = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve_bin), "run", "--address", "local", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    dataset = load_dataset(tiny[0])
    user, items = str(dataset.user_ids[2]), [str(i) for i in dataset.item_ids[1:21]]
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            deadline, health = time.monotonic() + 240, None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    health = client.get("/healthz")
                    if health.status_code == 200 and (health.json().get("trainer") or {}).get("state") == "training":
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            assert health is not None and health.status_code == 200, f"not up: {health and health.text}"
            first = client.post("/rank", json={"user_id": user, "candidates": items, "k": 5}).json()
            assert first["model_version"] == "v1"
            events = [{"event_id": f"served-{n}", "user_id": user, "item_id": items[n % 20], "type": "click"}
                      for n in range(30)]
            assert client.post("/events", json={"events": events}).json() == {"accepted": 30, "duplicates": 0}
            deadline, served = time.monotonic() + 60, first["model_version"]
            while time.monotonic() < deadline and served == "v1":
                served = client.post("/rank", json={"user_id": user, "candidates": items, "k": 5}).json()["model_version"]
                time.sleep(0.2)
            assert served != "v1", "no new version reached the scorers"
            info = client.get("/model").json()
            assert info["meta"]["events_applied"] >= 30
        stream = redis.Redis.from_url(redis_url)
        assert stream.xlen("served:events") == 30 and not stream.exists("rr:events")  # keys follow the prefix
        assert stream.exists("served:trainer:lease")
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run's Ctrl-C: shuts the app down gracefully
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

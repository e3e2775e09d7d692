"""The app on a real two-node Ray cluster (ray.cluster_utils.Cluster), run by test_multinode_e2e.py.

The head node has 0 CPUs, so every replica (Ingress, Scorer, OnlineTrainer) lands on the worker
node, which has its own environment (RERANK_CACHE_DIR). The builder runs in this driver with
`model: null`: replicas must find their model in the registry themselves. Exercises rank, events,
a trainer publish and the scorer's hot swap through the HTTP proxy on the head; prints one JSON
object with what it saw (the test asserts on it).

    python tests/multinode_app.py --registry DIR --data DIR --redis-url URL --work DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--registry", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--work", required=True)
    args = p.parse_args()
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"

    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from online_helpers import wait_until  # tests/ is this script's directory

    from deployments.app import build_app
    from rerank.data.dataset import load_dataset
    from rerank.infra.child_process import free_port
    from rerank.clients.replay import ReplayConfig, replay

    work = Path(args.work)
    flags = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0.5"}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "env_vars": {**flags, "RERANK_CACHE_DIR": str(work / "cache-head")}})
    worker = cluster.add_node(num_cpus=4, env_vars={**flags, "RERANK_CACHE_DIR": str(work / "cache-worker")})
    out: dict = {"worker_node": worker.node_id, "head_node": cluster.head_node.node_id}
    try:
        ray.init(address=cluster.address, namespace="multinode", log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # layout inline: a Scorer deployment, so its replica is tested off the builder's node too
        app = build_app({"layout": "inline", "model": None, "registry_uri": args.registry, "registry_poll_s": 0.2,
                         "redis_url": args.redis_url, "redis_prefix": "mn:", "data": args.data,
                         "catalogue_refresh_s": 0, "online": {"enabled": True, "publish_every_s": 0.3},
                         "allow_no_auth": True})  # loopback proxy, test cluster
        serve.run(app, name="multinode", route_prefix="/")
        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name.startswith("ServeReplica")]
        out["replica_nodes"] = {a.class_name: a.node_id for a in replicas}

        base = f"http://127.0.0.1:{port}"
        dataset = load_dataset(args.data)
        items = [str(i) for i in dataset.item_ids[1:31]]
        user = str(dataset.user_ids[1])
        with httpx.Client(base_url=base, timeout=30) as client:
            first = client.post("/rank", json={"user_id": user, "candidates": items, "k": 5})
            out["rank_status"], out["first_version"] = first.status_code, first.json().get("model_version")
            summary = replay(dataset, ReplayConfig(url=base, rate=200, limit=300, batch=20, progress=False))
            out["events"] = {"sent": summary.sent, "accepted": summary.accepted, "errors": summary.errors}

            def swapped():
                r = client.post("/rank", json={"user_id": user, "candidates": items, "k": 5})
                return r.status_code == 200 and r.json()["model_version"] != out["first_version"] and r.json()

            try:
                out["swapped_to"] = wait_until(swapped, "a hot swap", timeout_s=120)["model_version"]
            except AssertionError:
                out["swapped_to"] = None
            out["health"] = client.get("/healthz").json()
            out["model"] = client.get("/model").json()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

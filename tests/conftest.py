"""Shared fixtures. Real services only: a real Redis server, real Ray; no fakes."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real public datasets); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (present in CI; a fresh clone has none)")
    return SHARED_DATA


# --- Redis (owner: feature store) -------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (rerank.infra.redis_server.EmbeddedRedis) on a free port, for the session.

    Tests may stop() and start() it to simulate an outage: it restarts on the same port
    and data directory. Use `redis_url` for a flushed database.
    """
    from rerank.infra.redis_server import EmbeddedRedis

    server = EmbeddedRedis(data_dir=tmp_path_factory.mktemp("redis")).start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of the session's Redis server, running, with an empty database."""
    import redis

    redis_server.start()  # a previous test may have left it stopped
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


# --- tiny hand-made datasets (owner: evaluation) --------------------------------------


@pytest.fixture
def make_dataset(tmp_path):
    """make_dataset(sequences, timestamps=None, attributes=None) -> a loaded rerank Dataset.

    sequences[u] lists the item_idx (1..n_items) of user u+1 in time order; n_items is the
    largest idx used (or `n_items=`). Written with write_dataset into tmp_path, then loaded.
    """
    import pyarrow as pa

    from rerank.data.dataset import load_dataset, write_dataset

    counter = iter(range(1_000_000))

    def make(sequences, timestamps=None, attributes=None, n_items=None, name="tiny"):
        n_items = n_items or max(max(s) for s in sequences if len(s))
        users = pa.table({"user_idx": list(range(1, len(sequences) + 1)),
                          "user_id": [f"u{i}" for i in range(1, len(sequences) + 1)]})
        items = pa.table({"item_idx": list(range(1, n_items + 1)),
                          "item_id": [f"i{i}" for i in range(1, n_items + 1)],
                          "attributes": [list((attributes or {}).get(i, [])) for i in range(1, n_items + 1)]})
        rows = [(u + 1, item, (timestamps[u][k] if timestamps else k))
                for u, seq in enumerate(sequences) for k, item in enumerate(seq)]
        events = pa.table({"user_idx": [r[0] for r in rows], "item_idx": [r[1] for r in rows],
                           "event_type": ["purchase"] * len(rows), "ts": [r[2] for r in rows]})
        out = tmp_path / f"dataset-{next(counter)}"
        write_dataset(out, users, items, events, name, "test", has_timestamps=timestamps is not None)
        return load_dataset(out)

    return make


# --- Ray (owner: serving) ---------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_session():
    """Ray, started ONCE per test session with more logical CPUs than the machine has
    (Serve replicas reserve fractions of a CPU); shut down at the end with Serve."""
    import os

    import ray

    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # an ingress replica otherwise lingers 30 s after serve.delete (direct ingress draining)
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0.5")
    started = not ray.is_initialized()
    if started:
        # address="local": always a fresh cluster, never one that `ray start` left running
        ray.init(address="local", num_cpus=8, include_dashboard=False, namespace="rerank-tests",
                 configure_logging=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_session) -> str:
    """Serve's HTTP proxy, started ONCE per session on a free port (a second serve.start with
    other options is ignored by Serve, so every e2e module must share this one)."""
    from ray import serve

    from rerank.infra.child_process import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


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
    """A real redis-server (rerank.redis_server.EmbeddedRedis) on a free port, for the session.

    Tests may stop() and start() it to simulate an outage: it restarts on the same port
    and data directory. Use `redis_url` for a flushed database.
    """
    from rerank.redis_server import EmbeddedRedis

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

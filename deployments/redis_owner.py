"""A detached Ray actor that owns an embedded Redis server (for `serve run/deploy` with redis_url: embedded).

The actor is named, so every build of the app finds the same server; the
server's process dies with the actor (`ray stop`, or `ray.kill` of the actor).
Its data directory is persistent (append-only file) so events survive a
redeploy; by default ~/.cache/rerank/redis.
"""

from __future__ import annotations

from pathlib import Path

import ray

ACTOR_NAME = "rerank-embedded-redis"
NAMESPACE = "rerank"


@ray.remote(num_cpus=0)
class RedisOwner:
    def __init__(self, data_dir: str, maxmemory: int | None = None) -> None:
        from rerank.infra.redis_server import DEFAULT_MAXMEMORY, EmbeddedRedis

        self.server = EmbeddedRedis(data_dir=Path(data_dir), maxmemory=maxmemory or DEFAULT_MAXMEMORY)
        self.server.start().supervise()  # restarted when it dies

    def set_maxmemory(self, maxmemory: int) -> None:
        """A later build's memory plan: the running server's maxmemory, now and after restarts."""
        import redis

        self.server.maxmemory = maxmemory
        redis.Redis.from_url(self.server.url).config_set("maxmemory", maxmemory)

    def url(self) -> str:
        if not self.server.running:
            self.server.start()
        return self.server.url

    def stop(self) -> None:
        self.server.stop()


def embedded_redis_url(data_dir: str | Path, maxmemory: int | None = None) -> str:
    """URL of the cluster's embedded Redis, starting its owner actor on first use; `maxmemory`
    (bytes, from the app's memory plan) applies to a running server too."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    owner = RedisOwner.options(
        name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(str(data_dir), maxmemory)
    if maxmemory:
        ray.get(owner.set_maxmemory.remote(maxmemory))
    return ray.get(owner.url.remote())

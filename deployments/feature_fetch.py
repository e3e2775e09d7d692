"""FeatureFetch: the `split` layout's feature hop, a thin wrapper of rerank.serving.pipeline.FeatureFetcher."""

from __future__ import annotations

import asyncio

from ray import serve

from rerank.store.feature_store import FeatureStore
from rerank.store.keys import DEFAULT_PREFIX
from rerank.serving.item_cache import ItemCache
from rerank.serving.pipeline import FeatureFetcher, FetchedBatch, serving_catalogue


@serve.deployment(name="FeatureFetch", ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64,
                  logging_config={"enable_access_log": False})  # internal hop: the ingress logs requests
class FeatureFetch:
    def __init__(self, redis_url: str, model: str | None, registry_uri: str | None, history_len: int = 50,
                 prefix: str = DEFAULT_PREFIX, catalogue_refresh_s: float = 15.0,
                 item_cache_ttl_s: float = 1.0) -> None:
        store = FeatureStore(redis_url, prefix=prefix)
        self.fetcher = FeatureFetcher(store, serving_catalogue(model, registry_uri, store, catalogue_refresh_s),
                                      history_len, item_cache=ItemCache(ttl_s=item_cache_ttl_s))

    async def fetch(self, requests: list[tuple[str, list[str] | None]]) -> FetchedBatch:
        """Features for each (user_id, candidate ids | None = whole catalogue), in order; the Redis
        round trip runs in a thread so a hung server never blocks the replica's event loop."""
        return await asyncio.to_thread(self.fetcher.fetch, requests)

    def check_health(self) -> None:
        """Serve health check: the replica is fine even when Redis is down (it degrades)."""

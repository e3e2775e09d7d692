"""Ranker: the `split` layout's ranking hop, a thin wrapper of rerank.serving.pipeline.rank_batch."""

from __future__ import annotations

from ray import serve

from rerank.store.feature_store import FeatureStore
from rerank.store.keys import DEFAULT_PREFIX
from rerank.serving.pipeline import FetchedBatch, ModelScores, RankedBatch, RankPlan, ScoredBatch, rank_batch, serving_catalogue


@serve.deployment(name="Ranker", ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64,
                  logging_config={"enable_access_log": False})  # internal hop: the ingress logs requests
class Ranker:
    def __init__(self, model: str | None, registry_uri: str | None, redis_url: str | None = None,
                 prefix: str = DEFAULT_PREFIX, catalogue_refresh_s: float = 15.0) -> None:
        store = FeatureStore(redis_url, prefix=prefix) if redis_url else None
        self.catalogue = serving_catalogue(model, registry_uri, store, catalogue_refresh_s)

    async def rank(self, fetched: FetchedBatch, scored: ScoredBatch, plans: list[RankPlan]) -> RankedBatch:
        """Rank each request of the batch by the app's model (about 1 ms of numpy: run on the event
        loop). The split layout serves experiment arms that differ in rules only."""
        return rank_batch(fetched, {"": ModelScores(list(range(len(plans))), scored)}, plans, self.catalogue)

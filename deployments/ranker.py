"""Ranker: list-level re-ranking (rerank.ranking) of a whole batch in one call."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ray import serve

from deployments.catalogue_refresh import RefreshingCatalogue
from deployments.feature_fetch import FetchedBatch
from deployments.scorer import ScoredBatch
from rerank.ranking import RankingRules, popularity_prior, rank


@dataclass
class RankedBatch:
    """The finished batch: everything the ingress needs to answer each request."""

    items: list[list[tuple[str, float]]]
    degraded: list[bool]
    feature_age_ms: list[float | None]
    model_version: str
    scorer_batch_size: int
    timings_ms: dict[str, float]  # time spent inside each stage: features, score, rank


@serve.deployment(name="Ranker", ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64,
                  logging_config={"enable_access_log": False})  # internal hop: the ingress logs requests
class Ranker:
    def __init__(self, model_dir: str, redis_url: str | None = None, prefix: str = "rr:",
                 catalogue_refresh_s: float = 15.0) -> None:
        store = None
        if redis_url:
            from rerank.feature_store import FeatureStore

            store = FeatureStore(redis_url, prefix=prefix)
        self.catalogue = RefreshingCatalogue(model_dir, store, catalogue_refresh_s)

    async def rank(self, fetched: FetchedBatch, scored: ScoredBatch, rules: list[RankingRules]) -> RankedBatch:
        """Rank each request of the batch (about 1 ms of numpy: run on the event loop)."""
        start = time.perf_counter()
        catalogue = self.catalogue.current
        ranked = []
        for f, scores, r in zip(fetched.items, scored.scores, rules):
            features = f.features
            ranked.append(
                rank(
                    f.candidate_ids,
                    features.candidates,
                    scores,
                    rules=r,
                    purchased_idx=features.purchased,
                    attributes=catalogue.attributes_of(features.candidates),
                    popularity=popularity_prior(features.candidate_stats, len(f.candidate_ids)),
                )
            )
        elapsed = (time.perf_counter() - start) * 1000.0
        return RankedBatch(
            items=ranked,
            degraded=[f.degraded for f in fetched.items],
            feature_age_ms=[f.features.feature_age_ms for f in fetched.items],
            model_version=scored.model_version,
            scorer_batch_size=scored.batch_size,
            timings_ms={"features": fetched.elapsed_ms, "score": scored.elapsed_ms, "rank": elapsed},
        )

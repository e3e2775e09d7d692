"""Ranker: list-level re-ranking (rerank.ranking) of a whole batch in one call."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ray import serve

from deployments.catalogue_refresh import RefreshingCatalogue
from rerank.ranking import RankingRules, popularity_prior, rank


@dataclass
class RankJob:
    candidate_ids: list[str]
    candidate_idx: np.ndarray  # int32 (C,)
    scores: np.ndarray  # float32 (C,)
    rules: RankingRules
    purchased_idx: np.ndarray  # int32
    candidate_stats: np.ndarray | None  # (C, 4) event counters, None when degraded


@serve.deployment(name="Ranker", ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64)
class Ranker:
    def __init__(self, model_dir: str, redis_url: str | None = None, prefix: str = "rr:",
                 catalogue_refresh_s: float = 15.0) -> None:
        store = None
        if redis_url:
            from rerank.feature_store import FeatureStore

            store = FeatureStore(redis_url, prefix=prefix)
        self.catalogue = RefreshingCatalogue(model_dir, store, catalogue_refresh_s)

    def rank(self, jobs: list[RankJob]) -> list[list[tuple[str, float]]]:
        """Ranked (item_id, score) lists, one per job, in order."""
        catalogue = self.catalogue.current
        out = []
        for job in jobs:
            out.append(
                rank(
                    job.candidate_ids,
                    job.candidate_idx,
                    job.scores,
                    rules=job.rules,
                    purchased_idx=job.purchased_idx,
                    attributes=catalogue.attributes_of(job.candidate_idx),
                    popularity=popularity_prior(job.candidate_stats, len(job.candidate_ids)),
                )
            )
        return out

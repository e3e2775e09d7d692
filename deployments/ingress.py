"""Ingress: the FastAPI HTTP surface of the graph (POST /rank, POST /events, GET /healthz, /model).

/rank requests are collected by @serve.batch on `_rank_batch`, and each batch
crosses every hop with ONE handle call: FeatureFetch.fetch(list) ->
Scorer.score(list) -> Ranker.rank(list). The batch wait adapts to load: a
request that arrives alone goes at once (wait 0), under concurrency the
configured wait lets batches form.
"""


import asyncio
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.metrics import ServingMetrics
from deployments.ranker import RankJob
from rerank.api import (
    EventsRequest,
    EventsResponse,
    HealthResponse,
    ModelInfo,
    RankedItem,
    RankRequest,
    RankResponse,
    RequestLimitError,
    Timings,
    check_rank_limits,
)
from rerank.experiments import Variant, assign_variant
from rerank.feature_store import Event, FeatureStore, FeatureStoreUnavailable
from rerank.ranking import RankingRules
from rerank.scoring import ScoreInput

app = FastAPI(
    title="rerank",
    description="Real-time personalized re-ranking: POST /rank a user's candidates, POST /events behaviour.",
    version="0.1.0",
)


@dataclass
class IngressSettings:
    redis_url: str
    prefix: str = "rr:"
    max_candidates: int = 1000
    max_batch_size: int = 32
    batch_wait_s: float = 0.01
    adaptive_wait: bool = True
    retry_after_s: int = 1
    variants: list[Variant] = field(default_factory=lambda: [Variant("default")])


@dataclass
class _Pending:
    request: RankRequest
    rules: RankingRules
    variant: str
    arrived: float


def _limit_error(err: RequestLimitError) -> HTTPException:
    return HTTPException(422, detail=[{"loc": ["body", err.field], "msg": err.message, "type": "value_error"}])


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.3}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, feature_fetch: DeploymentHandle, scorer: DeploymentHandle, ranker: DeploymentHandle,
                 settings: IngressSettings) -> None:
        self.feature_fetch = feature_fetch
        self.scorer = scorer
        self.ranker = ranker
        self.settings = settings
        self.store = FeatureStore(settings.redis_url, prefix=settings.prefix)
        self.metrics = ServingMetrics()
        self._in_flight = 0
        self._rank_batch.set_max_batch_size(settings.max_batch_size)
        self._rank_batch.set_batch_wait_timeout_s(settings.batch_wait_s)

    # ------------------------------------------------------------------ /rank
    @app.post("/rank", response_model=RankResponse)
    async def rank(self, body: RankRequest) -> RankResponse:
        """Re-rank `candidates` (or the whole catalogue) for `user_id`."""
        try:
            check_rank_limits(body, self.settings.max_candidates)
        except RequestLimitError as err:
            self.metrics.requests.inc(tags={"route": "/rank", "status": "422"})
            raise _limit_error(err) from None
        variant = assign_variant(body.user_id, self.settings.variants)
        diversity = body.rules.diversity
        if "diversity" not in body.rules.model_fields_set and variant.diversity is not None:
            diversity = variant.diversity
        rules = RankingRules(
            k=body.k,
            diversity=diversity,
            exclude_purchased=body.rules.exclude_purchased,
            exclude_items=list(body.rules.exclude),
            boost=dict(body.rules.boost),
        )
        self._in_flight += 1
        if self.settings.adaptive_wait:  # alone: no point waiting for company
            self._rank_batch.set_batch_wait_timeout_s(self.settings.batch_wait_s if self._in_flight > 1 else 0.0)
        try:
            response = await self._rank_batch(_Pending(body, rules, variant.name, time.perf_counter()))
        finally:
            self._in_flight -= 1
        self.metrics.requests.inc(tags={"route": "/rank", "status": "200"})
        return response

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, max_concurrent_batches=4)
    async def _rank_batch(self, batch: list[_Pending]) -> list[RankResponse]:
        t0 = time.perf_counter()
        fetched = await self.feature_fetch.fetch.remote([(p.request.user_id, p.request.candidates) for p in batch])
        t1 = time.perf_counter()
        inputs = [ScoreInput(f.features.history, f.features.history_types, f.features.candidates) for f in fetched]
        scored = await self.scorer.score.remote(inputs)
        t2 = time.perf_counter()
        jobs = [
            RankJob(f.candidate_ids, f.features.candidates, s, p.rules, f.features.purchased,
                    f.features.candidate_stats)
            for p, f, s in zip(batch, fetched, scored.scores)
        ]
        ranked = await self.ranker.rank.remote(jobs)
        t3 = time.perf_counter()
        ms = lambda a, b: round((b - a) * 1000.0, 3)  # noqa: E731
        self.metrics.batch_size.observe(len(batch), tags={"hop": "ingress"})
        self.metrics.batch_size.observe(scored.batch_size, tags={"hop": "scorer"})
        for stage, (a, b) in {"features": (t0, t1), "score": (t1, t2), "rank": (t2, t3)}.items():
            self.metrics.stage_ms.observe((b - a) * 1000.0, tags={"stage": stage})
        out = []
        for p, f, items in zip(batch, fetched, ranked):
            if f.degraded:
                self.metrics.degraded.inc()
            self.metrics.stage_ms.observe((t3 - p.arrived) * 1000.0, tags={"stage": "total"})
            out.append(
                RankResponse(
                    items=[RankedItem(item_id=i, score=s) for i, s in items],
                    model_version=scored.model_version,
                    feature_age_ms=f.features.feature_age_ms,
                    degraded=f.degraded,
                    timings_ms=Timings(features=ms(t0, t1), score=ms(t1, t2), rank=ms(t2, t3), total=ms(p.arrived, t3)),
                    request_id=uuid.uuid4().hex,
                    variant=p.variant,
                    scorer_batch_size=scored.batch_size,
                )
            )
        return out

    # ------------------------------------------------------------------ /events
    @app.post("/events", response_model=EventsResponse)
    async def events(self, body: EventsRequest):
        """Store behaviour events: one atomic Redis step each, one round trip for the request."""
        events = [Event(user_id=e.user_id, item_id=e.item_id, type=e.type, ts=e.ts, event_id=e.event_id)
                  for e in body.events]
        try:
            applied = await asyncio.to_thread(self.store.write_events, events)
        except FeatureStoreUnavailable as err:
            self.metrics.requests.inc(tags={"route": "/events", "status": "503"})
            return JSONResponse(
                {"detail": f"feature store unavailable, events not stored; retry: {err}"},
                status_code=503,
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        except ValueError as err:
            self.metrics.requests.inc(tags={"route": "/events", "status": "422"})
            raise HTTPException(422, detail=[{"loc": ["body", "events"], "msg": str(err), "type": "value_error"}])
        accepted = sum(applied)
        if accepted:  # Ray counters refuse inc(0)
            self.metrics.events.inc(accepted, tags={"result": "stored"})
        if len(applied) - accepted:
            self.metrics.events.inc(len(applied) - accepted, tags={"result": "duplicate"})
        self.metrics.requests.inc(tags={"route": "/events", "status": "200"})
        return EventsResponse(accepted=accepted, duplicates=len(applied) - accepted)

    # ------------------------------------------------------------------ status
    @app.get("/healthz", response_model=HealthResponse)
    async def healthz(self):
        """Is Redis reachable, is a model loaded? 200 (ok or degraded), 503 without a model."""
        redis_ok = await asyncio.to_thread(self.store.ping)
        try:
            info = await self.scorer.current_version.remote()
            version = info["version"]
        except Exception:
            version = None
        health = HealthResponse(
            status="ok" if redis_ok and version else "degraded",
            redis=bool(redis_ok),
            model_loaded=version is not None,
            model_version=version,
        )
        return JSONResponse(health.model_dump(), status_code=200 if version else 503)

    @app.get("/model", response_model=ModelInfo)
    async def model(self) -> ModelInfo:
        """The weights a scorer replica serves: version, source, loaded_at, trained_until, meta."""
        from rerank.online import model_freshness

        info = await self.scorer.current_version.remote()
        info["freshness"] = await asyncio.to_thread(
            model_freshness, info.get("meta") or {}, info.get("loaded_at"), self.settings.redis_url,
            f"{self.settings.prefix}events")
        return ModelInfo(**info)

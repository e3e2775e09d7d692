"""Ingress: the FastAPI HTTP surface of the app (POST /rank, POST /events, GET /healthz, /model).

/rank requests are collected by a serve.batch queue (`_rank_batch`); each batch then takes
ONE handle call per hop, by layout:
- inline: features (rerank.serving.FeatureFetcher, Redis in a worker thread) and ranking
  (rerank.serving.rank_batch) run here; the only hop is Scorer.score(list);
- split: FeatureFetch.fetch(list) -> Scorer.score_features(...) -> Ranker.rank(...), chained
  DeploymentResponses; the ingress awaits only the last.
The batch wait adapts to load: a request that arrives alone goes at once (wait 0), under
concurrency the configured wait lets batches form.
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
from rerank.api import (
    RollbackRequest,
    EventsRequest,
    EventsResponse,
    HealthResponse,
    ModelInfo,
    RankRequest,
    RankResponse,
    RequestLimitError,
    check_rank_limits,
)
from rerank.experiments import Variant, assign_variant
from rerank.feature_store import Event, FeatureStore, FeatureStoreUnavailable
from rerank.ranking import RankingRules
from rerank.serving import FeatureFetcher, RankedBatch, rank_batch, serving_catalogue

app = FastAPI(
    title="rerank",
    description="Real-time personalized re-ranking: POST /rank a user's candidates, POST /events behaviour.",
    version="0.1.0",
)


@dataclass
class IngressSettings:
    redis_url: str
    prefix: str = "rr:"
    layout: str = "inline"  # inline | split (see the module docstring)
    model: str | None = None  # inline: where the catalogue comes from (as the scorer's model)
    registry_uri: str | None = None  # the registry the scorer follows; POST /admin/rollback moves it
    history_len: int = 50
    catalogue_refresh_s: float = 15.0
    max_candidates: int = 1000
    max_batch_size: int = 32
    batch_wait_s: float = 0.01
    max_concurrent_batches: int = 4
    adaptive_wait: bool = True
    retry_after_s: int = 1
    variants: list[Variant] = field(default_factory=lambda: [Variant("default")])


@dataclass
class _Pending:
    request: RankRequest
    rules: RankingRules
    variant: str
    arrived: float


async def _resolve(response):
    """Await a DeploymentResponse inside a coroutine (so asyncio.wait_for can bound it)."""
    return await response


def _limit_error(err: RequestLimitError) -> HTTPException:
    return HTTPException(422, detail=[{"loc": ["body", err.field], "msg": err.message, "type": "value_error"}])


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, scorer: DeploymentHandle, settings: IngressSettings, features: DeploymentHandle | None = None,
                 ranker: DeploymentHandle | None = None, trainer: DeploymentHandle | None = None) -> None:
        if settings.layout not in ("inline", "split"):
            raise ValueError(f"layout {settings.layout!r}: expected inline or split")
        if settings.layout == "split" and (features is None or ranker is None):
            raise ValueError("layout split needs the FeatureFetch and Ranker handles")
        self.scorer = scorer
        self.feature_fetch = features
        self.ranker = ranker
        self.trainer = trainer
        self.settings = settings
        self.store = FeatureStore(settings.redis_url, prefix=settings.prefix)
        if settings.layout == "inline":
            self.catalogue = serving_catalogue(settings.model, settings.registry_uri, self.store,
                                               settings.catalogue_refresh_s)
            self.fetcher = FeatureFetcher(self.store, self.catalogue, settings.history_len)
        self.metrics = ServingMetrics()
        self._in_flight = 0
        # the batch queue is built per replica so that every knob comes from the app's args
        self._rank_batch = serve.batch(
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=settings.batch_wait_s,
            max_concurrent_batches=settings.max_concurrent_batches,
        )(self._rank_many)

    # ------------------------------------------------------------------ /rank
    @app.post("/rank", response_model=RankResponse)
    async def rank(self, body: RankRequest) -> JSONResponse:
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

    async def _ranked(self, batch: list[_Pending]) -> RankedBatch:
        """Features, scores and ranking of one batch, one handle call per hop of the layout."""
        requests = [(p.request.user_id, p.request.candidates) for p in batch]
        rules = [p.rules for p in batch]
        if self.settings.layout == "inline":
            fetched = await asyncio.to_thread(self.fetcher.fetch, requests)  # never block the event loop
            scored = await self.scorer.score.remote(fetched.score_inputs())
            return rank_batch(fetched, scored, rules, self.catalogue)
        # split: chained calls, results travel between replicas by reference; one await per batch
        fetched = self.feature_fetch.fetch.remote(requests)
        scored = self.scorer.score_features.remote(fetched)
        return await self.ranker.rank.remote(fetched, scored, rules)

    async def _rank_many(self, batch: list[_Pending]) -> list[JSONResponse]:
        """One batch of /rank requests (called through the serve.batch queue `_rank_batch`)."""
        done = await self._ranked(batch)
        end = time.perf_counter()
        self.metrics.batch_size.observe(len(batch), tags={"hop": "ingress"})
        self.metrics.batch_size.observe(done.scorer_batch_size, tags={"hop": "scorer"})
        for stage, value in done.timings_ms.items():
            self.metrics.stage_ms.observe(value, tags={"stage": stage})
        stages = {k: round(v, 3) for k, v in done.timings_ms.items()}
        out = []
        for p, items, degraded, age in zip(batch, done.items, done.degraded, done.feature_age_ms):
            if degraded:
                self.metrics.degraded.inc()
            total = (end - p.arrived) * 1000.0
            self.metrics.stage_ms.observe(total, tags={"stage": "total"})
            # built as plain JSON (the RankResponse shape): skips re-validating our own output
            out.append(JSONResponse({
                "items": [{"item_id": i, "score": s} for i, s in items],
                "model_version": done.model_version,
                "feature_age_ms": age,
                "degraded": degraded,
                "timings_ms": {**stages, "total": round(total, 3)},
                "request_id": uuid.uuid4().hex,
                "variant": p.variant,
                "scorer_batch_size": done.scorer_batch_size,
            }))
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
        """Is Redis reachable, is a model loaded, what is the trainer doing? 200 (ok or degraded),
        503 without a model. A stuck scorer or trainer never hangs it (2 s bounds)."""
        redis_ok = await asyncio.to_thread(self.store.ping)
        try:
            info = await asyncio.wait_for(_resolve(self.scorer.current_version.remote()), timeout=2.0)
            version = info["version"]
        except Exception:
            version = None
        trainer = None
        if self.trainer is not None:
            try:
                stats = await asyncio.wait_for(_resolve(self.trainer.stats.remote()), timeout=2.0)
                trainer = {k: stats.get(k) for k in ("state", "version", "lag_events", "error", "error_at")}
            except Exception as err:
                trainer = {"state": "unreachable", "error": type(err).__name__}
        health = HealthResponse(
            status="ok" if redis_ok and version else "degraded",
            redis=bool(redis_ok),
            model_loaded=version is not None,
            model_version=version,
            trainer=trainer,
        )
        return JSONResponse(health.model_dump(), status_code=200 if version else 503)

    @app.get("/model", response_model=ModelInfo)
    async def model(self) -> ModelInfo:
        """The weights a scorer replica serves: version, source, loaded_at, trained_until, meta."""
        from rerank.online import model_freshness

        info = await self.scorer.current_version.remote()
        info["freshness"] = await asyncio.to_thread(
            model_freshness, info.get("meta") or {}, info.get("loaded_at"), self.settings.redis_url,
            self.store.keys.events)
        return ModelInfo(**info)

    # ------------------------------------------------------------------ admin (online learning)
    @app.post("/admin/rollback")
    async def admin_rollback(self, body: RollbackRequest) -> dict:
        """Point the registry's LATEST at `version` and pin it (or `unpin: true` to release the pin);
        the scorers follow within a poll interval. Unauthenticated: expose it on an internal network only."""
        from rerank.registry import ModelRegistry, RegistryError

        if not self.settings.registry_uri:
            raise HTTPException(409, detail="the app has no registry_uri; nothing to roll back")
        registry = ModelRegistry(self.settings.registry_uri)
        try:
            if body.unpin:
                await asyncio.to_thread(registry.unpin)
            else:
                if body.version is None:
                    raise HTTPException(422, detail=[{"loc": ["body", "version"], "msg": "give version or unpin",
                                                      "type": "value_error"}])
                await asyncio.to_thread(registry.rollback, body.version, body.reason or "admin rollback")
        except RegistryError as err:
            raise HTTPException(404, detail=str(err)) from None
        ptr = registry.pointer()
        return {"latest": ptr.version if ptr else None, "pinned": bool(ptr and ptr.pinned)}

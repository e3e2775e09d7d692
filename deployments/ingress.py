"""Ingress: the FastAPI HTTP surface of the app (POST /rank, POST /events, GET /healthz, /model, /admin).

/rank requests are collected by a serve.batch queue (`_rank_batch`); each batch then takes
ONE handle call per hop, by layout:
- inline: features (rerank.serving.FeatureFetcher, Redis in a worker thread) and ranking
  (rerank.serving.rank_batch) run here; the only hop is Scorer.score(list);
- split: FeatureFetch.fetch(list) -> Scorer.score_features(...) -> Ranker.rank(...), chained
  DeploymentResponses; the ingress awaits only the last.
The batch wait adapts to load: a request that arrives alone goes at once (wait 0), under
concurrency the configured wait lets batches form.

Safety: every route but /healthz needs an API key with its scope when keys are configured
(rerank.auth; 401 / 403). One request never fails another of its batch: a request whose
ranking fails gets its own 500, a scorer that fails or times out gives every request of the
batch a popularity ranking flagged `degraded` (inline layout), and over `max_in_flight`
requests the ingress answers 503 with Retry-After at once instead of queueing. Bodies over
MAX_BODY_BYTES get 413 before they are parsed. Error bodies name no secrets.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures of this
# Serve-wrapped class at runtime, and string annotations there turn the request body into a
# required query parameter (every /rank answered 422).
import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.metrics import ServingMetrics
from rerank.api import (
    DEFAULT_MAX_CATALOGUE_ITEMS,
    MAX_BODY_BYTES,
    EventsRequest,
    EventsResponse,
    HealthResponse,
    ModelInfo,
    RankRequest,
    RankResponse,
    RequestLimitError,
    RollbackRequest,
    check_rank_limits,
)
from rerank.auth import ApiKeys, AuthError, Scope, redact
from rerank.experiments import Variant, assign_variant
from rerank.feature_store import DEFAULT_PREFIX, Event, FeatureStore, FeatureStoreUnavailable
from rerank.ranking import RankingRules
from rerank.serving import FeatureFetcher, RankedBatch, ScoredBatch, rank_batch, serving_catalogue

logger = logging.getLogger("ray.serve")
bearer = HTTPBearer(auto_error=False, description="API key: Authorization: Bearer <key>")


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes` (Content-Length or streamed)."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge
            return message

        try:
            return await self.app(scope, counted, send)
        except _BodyTooLarge:
            return await self._too_large(send)

    async def _too_large(self, send) -> None:
        response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
        await response({"type": "http"}, None, send)


class _BodyTooLarge(Exception):
    pass


app = FastAPI(
    title="rerank",
    description="Real-time personalized re-ranking: POST /rank a user's candidates, POST /events behaviour.",
    version="0.2.0",
)
app.add_middleware(BodyLimit)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field: loc, msg and type only. FastAPI's default echoes the input,
    which cannot even be rendered when it is a non-finite number (it became a 500)."""
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


@dataclass
class IngressSettings:
    redis_url: str
    prefix: str = DEFAULT_PREFIX
    layout: str = "inline"  # inline | split (see the module docstring)
    model: str | None = None  # where the catalogue comes from (as the scorer's model)
    registry_uri: str | None = None  # the registry the scorer follows; POST /admin/rollback moves it
    history_len: int = 50
    catalogue_refresh_s: float = 15.0
    max_candidates: int = 1000
    max_catalogue_items: int | None = DEFAULT_MAX_CATALOGUE_ITEMS  # whole-catalogue ranking cap (None = off)
    item_capacity: int | None = None  # highest item_idx events may create (None = no cap)
    max_batch_size: int = 32
    batch_wait_s: float = 0.01
    max_concurrent_batches: int = 4
    adaptive_wait: bool = True
    max_in_flight: int = 64  # /rank requests inside this replica; more answer 503 + Retry-After
    score_timeout_s: float = 2.0  # a slower scorer call gives a degraded (popularity) ranking
    retry_after_s: int = 1
    keys: ApiKeys = field(default_factory=ApiKeys)  # no keys = auth off (loopback only, see rerank.auth)
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


RETRY_LATER = {"description": "overloaded or a dependency unavailable: nothing was done; retry",
               "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}}
UNPARSABLE = {"description": "the body is not UTF-8 text (FastAPI cannot parse it)"}
KEYED = {401: {"description": "API key missing, malformed or unknown"},
         403: {"description": "the API key lacks this route's scope"}}


def _unavailable(what: str, retry_after_s: int) -> JSONResponse:
    return JSONResponse({"detail": f"{what}; retry"}, status_code=503, headers={"Retry-After": str(retry_after_s)})


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256,
                  max_queued_requests=128)  # beyond: Serve answers 503 before the hop
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
        self.store = FeatureStore(settings.redis_url, prefix=settings.prefix, item_capacity=settings.item_capacity)
        self.catalogue = serving_catalogue(settings.model, settings.registry_uri, self.store,
                                           settings.catalogue_refresh_s)
        if settings.layout == "inline":
            self.fetcher = FeatureFetcher(self.store, self.catalogue, settings.history_len)
        self.metrics = ServingMetrics()
        self._in_flight = 0
        self._model_version = "none"  # the last version the scorer answered with (for degraded answers)
        # the batch queue is built per replica so that every knob comes from the app's args
        self._rank_batch = serve.batch(
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=settings.batch_wait_s,
            max_concurrent_batches=settings.max_concurrent_batches,
        )(self._rank_many)

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None, scope: Scope, route: str) -> str:
        header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
        try:
            return self.settings.keys.authorize(header, scope)
        except AuthError as err:
            self.metrics.requests.inc(tags={"route": route, "status": str(err.status)})
            raise HTTPException(err.status, detail=err.message, headers=err.headers) from None

    # ------------------------------------------------------------------ /rank
    @app.post("/rank", response_model=RankResponse,
              responses={**KEYED, 400: UNPARSABLE, 413: {"description": "body over 1 MiB"}, 503: RETRY_LATER})
    async def rank(self, body: RankRequest, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """Re-rank `candidates` (or the whole catalogue) for `user_id`."""
        self._authorize(credentials, "rank", "/rank")
        try:
            check_rank_limits(body, self.settings.max_candidates, catalogue_size=self.catalogue.current.n_items,
                              max_catalogue=self.settings.max_catalogue_items)
        except RequestLimitError as err:
            self.metrics.requests.inc(tags={"route": "/rank", "status": "422"})
            raise _limit_error(err) from None
        if self._in_flight >= self.settings.max_in_flight:  # shed now rather than queue without bound
            self.metrics.requests.inc(tags={"route": "/rank", "status": "503"})
            return _unavailable("overloaded", self.settings.retry_after_s)
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
        self.metrics.requests.inc(tags={"route": "/rank", "status": str(response.status_code)})
        return response

    async def _scores(self, fetched) -> ScoredBatch:
        """The scorer's answer for an inline batch, or NaN scores (popularity ranking, degraded)
        when it fails or takes longer than score_timeout_s."""
        try:
            scored = await asyncio.wait_for(_resolve(self.scorer.score.remote(fetched.score_inputs())),
                                            timeout=self.settings.score_timeout_s)
            self._model_version = scored.model_version
            return scored
        except Exception as err:  # timeout, dead replica, ...: rank without the model
            logger.warning("scorer call failed (%s): degraded ranking for %d requests", type(err).__name__,
                           len(fetched.items))
            nan = [np.full(len(f.candidate_ids), np.nan, dtype=np.float32) for f in fetched.items]
            return ScoredBatch(nan, self._model_version, len(fetched.items), 0.0, degraded=True)

    async def _ranked(self, batch: list[_Pending]) -> RankedBatch:
        """Features, scores and ranking of one batch, one handle call per hop of the layout."""
        requests = [(p.request.user_id, p.request.candidates) for p in batch]
        rules = [p.rules for p in batch]
        if self.settings.layout == "inline":
            fetched = await asyncio.to_thread(self.fetcher.fetch, requests)  # never block the event loop
            return rank_batch(fetched, await self._scores(fetched), rules, self.catalogue)
        # split: chained calls, results travel between replicas by reference; one await per batch
        fetched = self.feature_fetch.fetch.remote(requests)
        scored = self.scorer.score_features.remote(fetched)
        return await self.ranker.rank.remote(fetched, scored, rules)

    async def _rank_many(self, batch: list[_Pending]) -> list[JSONResponse]:
        """One batch of /rank requests (called through the serve.batch queue `_rank_batch`).

        Never raises: a batch-wide failure answers each request 503 (retryable), and each
        response is built on its own, so one request's failure stays its own."""
        try:
            done = await self._ranked(batch)
        except Exception as err:
            logger.warning("rank batch of %d failed: %s", len(batch), type(err).__name__)
            return [_unavailable("ranking unavailable", self.settings.retry_after_s) for _ in batch]
        end = time.perf_counter()
        self.metrics.batch_size.observe(len(batch), tags={"hop": "ingress"})
        self.metrics.batch_size.observe(done.scorer_batch_size, tags={"hop": "scorer"})
        for stage, value in done.timings_ms.items():
            self.metrics.stage_ms.observe(value, tags={"stage": stage})
        stages = {k: round(v, 3) for k, v in done.timings_ms.items()}
        return [self._response(done, i, p, stages, end) for i, p in enumerate(batch)]

    def _response(self, done: RankedBatch, i: int, p: _Pending, stages: dict, end: float) -> JSONResponse:
        request_id = uuid.uuid4().hex
        try:
            if done.errors[i] is not None:
                raise RuntimeError(done.errors[i])
            degraded = done.degraded[i]
            if degraded:
                self.metrics.degraded.inc()
            total = (end - p.arrived) * 1000.0
            self.metrics.stage_ms.observe(total, tags={"stage": "total"})
            # built as plain JSON (the RankResponse shape): skips re-validating our own output
            return JSONResponse({
                "items": [{"item_id": item, "score": score} for item, score in done.items[i]],
                "model_version": done.model_version,
                "feature_age_ms": done.feature_age_ms[i],
                "degraded": degraded,
                "timings_ms": {**stages, "total": round(total, 3)},
                "request_id": request_id,
                "variant": p.variant,
                "scorer_batch_size": done.scorer_batch_size,
            })
        except Exception as err:  # this request only; the rest of the batch is answered
            logger.warning("request %s failed: %s", request_id, redact(str(err)))
            return JSONResponse({"detail": "ranking this request failed", "request_id": request_id}, status_code=500)

    # ------------------------------------------------------------------ /events
    @app.post("/events", response_model=EventsResponse,
              responses={**KEYED, 400: UNPARSABLE, 413: {"description": "body over 1 MiB"}, 503: RETRY_LATER})
    async def events(self, body: EventsRequest, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """Store behaviour events: one atomic Redis step each, one round trip for the request."""
        self._authorize(credentials, "events", "/events")
        events = [Event(user_id=e.user_id, item_id=e.item_id, type=e.type, ts=e.ts, event_id=e.event_id)
                  for e in body.events]
        try:
            written = await asyncio.to_thread(self.store.write_events_detailed, events)
        except FeatureStoreUnavailable:
            self.metrics.requests.inc(tags={"route": "/events", "status": "503"})
            return _unavailable("feature store unavailable, events not stored", self.settings.retry_after_s)
        except ValueError as err:
            self.metrics.requests.inc(tags={"route": "/events", "status": "422"})
            raise HTTPException(422, detail=[{"loc": ["body", "events"], "msg": str(err), "type": "value_error"}])
        applied = written.applied
        accepted = sum(applied)
        for result, count in (("stored", accepted), ("duplicate", len(applied) - accepted),
                              ("new_item", written.new_items), ("over_item_capacity", written.over_capacity)):
            if count:  # Ray counters refuse inc(0)
                self.metrics.events.inc(count, tags={"result": result})
        self.metrics.requests.inc(tags={"route": "/events", "status": "200"})
        return EventsResponse(accepted=accepted, duplicates=len(applied) - accepted)

    # ------------------------------------------------------------------ status
    @app.get("/healthz", response_model=HealthResponse,
             responses={503: {"model": HealthResponse, "description": "no model loaded"}})
    async def healthz(self):
        """Is Redis reachable, is a model loaded, what is the trainer doing? 200 (ok or degraded),
        503 without a model. A stuck scorer or trainer never hangs it (2 s bounds). No key needed."""
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
                trainer = {k: stats.get(k) for k in ("state", "version", "lag_events", "error_at")}
                trainer["error"] = redact(stats["error"]) if stats.get("error") else None
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

    @app.get("/model", response_model=ModelInfo, responses=KEYED)
    async def model(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ModelInfo:
        """The weights a scorer replica serves: version, source, loaded_at, trained_until, meta."""
        from rerank.online import model_freshness

        self._authorize(credentials, "rank", "/model")
        info = await self.scorer.current_version.remote()
        info["freshness"] = await asyncio.to_thread(
            model_freshness, info.get("meta") or {}, info.get("loaded_at"), self.settings.redis_url,
            self.store.keys.events)
        return ModelInfo(**info)

    # ------------------------------------------------------------------ admin (online learning)
    @app.post("/admin/rollback", responses={**KEYED, 400: UNPARSABLE, 404: {"description": "no such version"},
                                            409: {"description": "the app has no registry"}})
    async def admin_rollback(self, body: RollbackRequest,
                             credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """Point the registry's LATEST at `version` and pin it (or `unpin: true` to release the pin);
        the scorers follow within a poll interval. Needs the admin scope."""
        from rerank.registry import ModelRegistry, RegistryError

        self._authorize(credentials, "admin", "/admin/rollback")
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
            raise HTTPException(404, detail=redact(str(err))) from None
        ptr = registry.pointer()
        return {"latest": ptr.version if ptr else None, "pinned": bool(ptr and ptr.pinned)}

    @app.get("/admin/trainer", responses={**KEYED, 404: {"description": "the app runs without a trainer"}})
    async def admin_trainer(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """The online trainer's counters, state, lag and event -> publish delays. Needs the admin scope."""
        self._authorize(credentials, "admin", "/admin/trainer")
        if self.trainer is None:
            raise HTTPException(404, detail="this app runs without an online trainer")
        stats = await asyncio.wait_for(_resolve(self.trainer.stats.remote()), timeout=5.0)
        stats["error"] = redact(stats["error"]) if stats.get("error") else None
        return stats

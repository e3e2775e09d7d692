"""Ingress: the FastAPI HTTP surface of the app (POST /rank, POST /events, GET /healthz, /model, /admin).

/rank requests are collected by a serve.batch queue (`_rank_batch`); each batch then takes
ONE handle call per hop, by layout:
- inline: features (rerank.serving.pipeline.FeatureFetcher, Redis in a worker thread) and ranking
  (rerank.serving.pipeline.rank_batch) run here; the only hop is Scorer.score(list);
- split: FeatureFetch.fetch(list) -> Scorer.score_features(...) -> Ranker.rank(...), chained
  DeploymentResponses; the ingress awaits only the last.
The batch wait adapts to load: a request that arrives alone goes at once (wait 0), under
concurrency the configured wait lets batches form.

Safety: every route but /healthz needs an API key with its scope when keys are configured
(rerank.serving.auth; 401 / 403). One request never fails another of its batch: a request whose
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import redis
from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.metrics import ServingMetrics
from rerank.serving.api import (
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
from rerank.infra.redact import redact
from rerank.serving.auth import ApiKeys, AuthError, Scope
from rerank.experiments.attribution import AttributionConfig, ImpressionLog
from rerank.experiments.book import (
    EXPERIMENT_NAME,
    Assignment,
    ExperimentSpec,
    LiveBook,
    read_book,
    servable,
    stop_experiment,
    unreadable_model,
    write_experiment,
)
from rerank.store.errors import FeatureStoreUnavailable
from rerank.store.events import Event
from rerank.store.feature_store import FeatureStore
from rerank.store.keys import DEFAULT_PREFIX
from rerank.serving.ranking import RankingRules
from rerank.eventlog.records import Impression
from rerank.serving.pipeline import (
    FeatureFetcher,
    ModelScores,
    RankedBatch,
    RankPlan,
    ScoredBatch,
    rank_batch,
    score_groups,
    serving_catalogue,
)

logger = logging.getLogger("ray.serve")
REPORT_TIMEOUT_S = 30.0  # GET /experiments/{name}/report reads Parquet; longer is a 503
SPLIT_CHAIN_TIMEOUTS = 3  # the split layout's three chained hops get score_timeout_s each
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
    new_item_rate_per_min: int | None = None  # new items events may create per minute (None = no rate)
    max_batch_size: int = 32
    batch_wait_s: float = 0.01
    max_concurrent_batches: int = 4
    adaptive_wait: bool = True
    max_in_flight: int = 64  # /rank requests inside this replica; more answer 503 + Retry-After
    score_timeout_s: float = 2.0  # a slower scorer call gives a degraded (popularity) ranking
    retry_after_s: int = 1
    keys: ApiKeys = field(default_factory=ApiKeys)  # no keys = auth off (loopback only, see rerank.serving.auth)
    experiments_refresh_s: float = 1.0  # how soon a changed experiment book reaches this replica
    arm_trainers: tuple[str, ...] = ()  # "experiment/arm" of the arms whose own trainer the app runs
    record_impressions: bool = True
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    sink_dir: str | None = None  # the Parquet the sink writes (GET /experiments/{name}/report reads it)


@dataclass
class _Pending:
    request: RankRequest
    plan: RankPlan
    assignment: Assignment
    request_id: str
    arrived: float


def _arm_rules(body: RankRequest, assignment: Assignment, arm: str) -> RankingRules:
    """The request's rules, with the arm's defaults where the request does not set them."""
    diversity = body.rules.diversity
    arm_spec = assignment.spec.arms[arm] if assignment.spec is not None else None
    if "diversity" not in body.rules.model_fields_set and arm_spec is not None and arm_spec.rules.diversity is not None:
        diversity = arm_spec.rules.diversity
    return RankingRules(k=body.k, diversity=diversity, exclude_purchased=body.rules.exclude_purchased,
                        exclude_items=list(body.rules.exclude), boost=dict(body.rules.boost))


def rank_plan(body: RankRequest, assignment: Assignment, request_id: str, models: bool = True) -> RankPlan:
    """How this request is ranked in its arm. `models=False` (split layout): arms differ in rules only."""
    spec = assignment.spec
    if spec is None:
        return RankPlan.single(_arm_rules(body, assignment, ""))
    if assignment.interleaved and models:
        names = tuple(spec.arms)
        return RankPlan(tuple(_arm_rules(body, assignment, n) for n in names),
                        tuple(spec.arms[n].model_key for n in names), teams=names, request_id=request_id)
    if assignment.interleaved:
        return RankPlan.single(_arm_rules(body, assignment, next(iter(spec.arms))))
    key = spec.arms[assignment.arm].model_key if models else ""
    return RankPlan.single(_arm_rules(body, assignment, assignment.arm), key)


async def _resolve(response):
    """Await a DeploymentResponse inside a coroutine (so asyncio.wait_for can bound it)."""
    return await response


async def _trainer_stats(trainer: DeploymentHandle) -> dict:
    stats = await asyncio.wait_for(_resolve(trainer.stats.remote()), timeout=5.0)
    stats["error"] = redact(stats["error"]) if stats.get("error") else None
    return stats


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
                 ranker: DeploymentHandle | None = None, trainer: DeploymentHandle | None = None,
                 arm_trainers: dict[str, DeploymentHandle] | None = None, sink: DeploymentHandle | None = None) -> None:
        if settings.layout not in ("inline", "split"):
            raise ValueError(f"layout {settings.layout!r}: expected inline or split")
        if settings.layout == "split" and (features is None or ranker is None):
            raise ValueError("layout split needs the FeatureFetch and Ranker handles")
        self.scorer = scorer
        self.feature_fetch = features
        self.ranker = ranker
        self.trainer = trainer
        self.arm_trainers = arm_trainers or {}  # "experiment/arm" -> that arm's own OnlineTrainer
        self.sink = sink
        self.settings = settings
        self.store = FeatureStore(settings.redis_url, prefix=settings.prefix, item_capacity=settings.item_capacity,
                                  new_item_rate_per_min=settings.new_item_rate_per_min)
        self.catalogue = serving_catalogue(settings.model, settings.registry_uri, self.store,
                                           settings.catalogue_refresh_s)
        if settings.layout == "inline":
            self.fetcher = FeatureFetcher(self.store, self.catalogue, settings.history_len)
        self.metrics = ServingMetrics()
        self._in_flight = 0
        self._model_versions: dict[str, str] = {}  # model key -> last version it answered with (degraded answers)
        self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.book = LiveBook(self._redis, self.store.keys.experiments, settings.experiments_refresh_s)
        self.impressions = ImpressionLog(self._redis, self.store.keys, settings.attribution)
        # arm model checks and readouts may take long: their own threads, never the event loop's
        # default pool that the Redis calls of /rank and /events use
        self._model_checks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="slow-admin")
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
        assignment = self.book.assign(body.user_id)
        request_id = uuid.uuid4().hex
        plan = rank_plan(body, assignment, request_id, models=self.settings.layout == "inline")
        self._in_flight += 1
        if self.settings.adaptive_wait:  # alone: no point waiting for company
            self._rank_batch.set_batch_wait_timeout_s(self.settings.batch_wait_s if self._in_flight > 1 else 0.0)
        try:
            response = await self._rank_batch(_Pending(body, plan, assignment, request_id, time.perf_counter()))
        finally:
            self._in_flight -= 1
        self.metrics.requests.inc(tags={"route": "/rank", "status": str(response.status_code)})
        return response

    async def _scores(self, fetched, model_key: str, indices: list[int]) -> ModelScores:
        """The scorer's answer for the requests `indices` of an inline batch by one model, or NaN
        scores (popularity ranking, degraded) when it fails or takes longer than score_timeout_s."""
        try:
            call = self.scorer.score.remote(fetched.score_inputs(indices), model_key)
            scored = await asyncio.wait_for(_resolve(call), timeout=self.settings.score_timeout_s)
            self._model_versions[model_key] = scored.model_version
        except Exception as err:  # timeout, dead replica, unloadable arm model ...: rank without the model
            logger.warning("scorer call failed (%s): degraded ranking for %d requests", type(err).__name__,
                           len(indices))
            nan = [np.full(len(fetched.items[i].candidate_ids), np.nan, dtype=np.float32) for i in indices]
            scored = ScoredBatch(nan, self._model_versions.get(model_key, "none"), len(indices), 0.0, degraded=True)
        return ModelScores(indices, scored)

    async def _ranked(self, batch: list[_Pending]) -> RankedBatch:
        """Features, scores and ranking of one batch, one handle call per hop of the layout (inline:
        one scorer call per model the batch's experiment arms need, concurrently)."""
        requests = [(p.request.user_id, p.request.candidates) for p in batch]
        plans = [p.plan for p in batch]
        if self.settings.layout == "inline":
            fetched = await asyncio.to_thread(self.fetcher.fetch, requests)  # never block the event loop
            groups = score_groups(plans)
            answers = await asyncio.gather(*(self._scores(fetched, key, idx) for key, idx in groups.items()))
            return rank_batch(fetched, dict(zip(groups, answers)), plans, self.catalogue)
        # split: chained calls, results travel between replicas by reference; one await per batch,
        # bounded (a hop that hangs gives the batch a retryable 503, not a wait without end)
        fetched = self.feature_fetch.fetch.remote(requests)
        scored = self.scorer.score_features.remote(fetched)
        ranked = self.ranker.rank.remote(fetched, scored, plans)
        return await asyncio.wait_for(_resolve(ranked), timeout=SPLIT_CHAIN_TIMEOUTS * self.settings.score_timeout_s)

    async def _record(self, done: RankedBatch, batch: list[_Pending]) -> None:
        """Impressions of the answered requests (one Redis round trip); a failure is counted, the
        answers still go out."""
        now = time.time()
        shown = [Impression(p.request_id, p.request.user_id, p.assignment.experiment, p.assignment.arm,
                            done.model_versions[i], now,
                            [(item, score, team) for (item, score), team in zip(done.items[i], done.teams[i])])
                 for i, p in enumerate(batch) if done.errors[i] is None]
        try:
            await asyncio.to_thread(self.impressions.record, shown)
            self.metrics.impressions.inc(len(shown), tags={"result": "recorded"})
        except Exception as err:
            logger.warning("recording %d impressions failed: %s", len(shown), type(err).__name__)
            self.metrics.impressions.inc(len(shown), tags={"result": "lost"})

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
        if self.settings.record_impressions and any(e is None for e in done.errors):
            await self._record(done, batch)
        return [self._response(done, i, p, stages, end) for i, p in enumerate(batch)]

    def _response(self, done: RankedBatch, i: int, p: _Pending, stages: dict, end: float) -> JSONResponse:
        request_id = p.request_id
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
                "model_version": done.model_versions[i],
                "feature_age_ms": done.feature_age_ms[i],
                "degraded": degraded,
                "timings_ms": {**stages, "total": round(total, 3)},
                "request_id": request_id,
                "experiment": p.assignment.experiment,
                "arm": p.assignment.arm,
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
        try:
            events = await asyncio.to_thread(self._attributed, body.events)
            written = await asyncio.to_thread(self.store.write_events_detailed, events)
        except (FeatureStoreUnavailable, redis.RedisError):
            self.metrics.requests.inc(tags={"route": "/events", "status": "503"})
            return _unavailable("feature store unavailable, events not stored", self.settings.retry_after_s)
        except ValueError as err:
            self.metrics.requests.inc(tags={"route": "/events", "status": "422"})
            raise HTTPException(422, detail=[{"loc": ["body", "events"], "msg": str(err), "type": "value_error"}])
        applied = written.applied
        accepted = sum(applied)
        for result, count in (("stored", accepted), ("duplicate", len(applied) - accepted),
                              ("new_item", written.new_items), ("over_item_capacity", written.over_capacity),
                              ("over_new_item_rate", written.over_rate)):
            if count:  # Ray counters refuse inc(0)
                self.metrics.events.inc(count, tags={"result": result})
        self.metrics.requests.inc(tags={"route": "/events", "status": "200"})
        return EventsResponse(accepted=accepted, duplicates=len(applied) - accepted)

    def _attributed(self, events: list) -> list[Event]:
        """Events with their attribution fields: the impression that showed the item (by request_id,
        else the user's latest within the window), or else the user's current assignment."""
        found = self.impressions.attribute([(e.user_id, e.item_id, e.request_id) for e in events])
        for how, count in Counter(hit.how or "none" for hit in found).items():
            self.metrics.attributed.inc(count, tags={"how": how})
        out = []
        for e, hit in zip(events, found):
            if hit.how:
                extra = hit.fields()
            else:  # not shown by us (or too long ago): the user's arm, the client's claim kept
                assignment = self.book.assign(e.user_id)
                extra = {"request_id": e.request_id or "", "position": "" if e.position is None else str(e.position),
                         "experiment": assignment.experiment, "arm": assignment.arm, "team": "", "attributed": ""}
            extra["value"] = "" if e.value is None else repr(float(e.value))
            out.append(Event(user_id=e.user_id, item_id=e.item_id, type=e.type, ts=e.ts, event_id=e.event_id,
                             extra=extra))
        return out

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

    @app.get("/model", response_model=ModelInfo, responses={**KEYED, 503: RETRY_LATER})
    async def model(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ModelInfo:
        """The weights a scorer replica serves: version, source, loaded_at, trained_until, meta."""
        from rerank.online.freshness import model_freshness

        self._authorize(credentials, "rank", "/model")
        try:
            info = await asyncio.wait_for(_resolve(self.scorer.current_version.remote()), timeout=5.0)
        except Exception:  # a stuck or restarting scorer: say so, do not hang the client
            return _unavailable("scorer unavailable", self.settings.retry_after_s)
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
        from rerank.models.registry import ModelRegistry, RegistryError

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
        if self.trainer is None and not self.arm_trainers:
            raise HTTPException(404, detail="this app runs without an online trainer")
        stats = await _trainer_stats(self.trainer) if self.trainer is not None else {}
        if self.arm_trainers:  # experiment arms' own trainers
            stats["arms"] = {arm: await _trainer_stats(handle) for arm, handle in self.arm_trainers.items()}
        return stats

    @app.get("/admin/sink", responses={**KEYED, 404: {"description": "the app runs without a sink"}})
    async def admin_sink(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """The Parquet sink's state and counters. Needs the admin scope."""
        self._authorize(credentials, "admin", "/admin/sink")
        if self.sink is None:
            raise HTTPException(404, detail="this app runs without a sink")
        return await asyncio.wait_for(_resolve(self.sink.stats.remote()), timeout=5.0)

    # ------------------------------------------------------------------ experiments
    @app.get("/experiments", responses=KEYED)
    async def experiments(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """The experiment book (rerank.experiments.book), in assignment order. Needs the admin scope."""
        self._authorize(credentials, "admin", "/experiments")
        book = await asyncio.to_thread(read_book, self._redis, self.store.keys.experiments)
        return {"experiments": {e.name: e.spec.model_dump() for e in book}}

    @app.put("/admin/experiments/{name}", responses={**KEYED, 400: UNPARSABLE, 409: {
        "description": "the layout or the app cannot serve it (split layout with models, an online arm "
                       "without its trainer, an arm model that does not load)"}})
    async def put_experiment(self, body: ExperimentSpec, name: str = Path(pattern=EXPERIMENT_NAME),
                             credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """Add or change an experiment (ramp weights, add arms); replicas follow within a second."""
        self._authorize(credentials, "admin", "/admin/experiments")
        problem = servable(name, body, self.settings.layout, self.settings.arm_trainers)
        if problem is None:  # refuse an arm whose model no scorer could load (its users would go degraded)
            try:
                check = asyncio.get_running_loop().run_in_executor(self._model_checks, unreadable_model, body)
                problem = await asyncio.wait_for(check, timeout=5.0)
            except asyncio.TimeoutError:
                problem = "an arm's model source did not answer within 5 s"
        if problem:
            raise HTTPException(409, detail=redact(problem))
        try:
            book = await asyncio.to_thread(write_experiment, self._redis, self.store.keys.experiments, name, body)
        except ValueError as err:
            raise HTTPException(422, detail=[{"loc": ["body", "traffic"], "msg": str(err), "type": "value_error"}])
        self.book.refresh()
        return {"experiments": [e.name for e in book]}

    @app.delete("/admin/experiments/{name}", responses={**KEYED, 404: {"description": "no such experiment"}})
    async def delete_experiment(self, name: str = Path(pattern=EXPERIMENT_NAME),
                              credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """Stop an experiment: its users get the default ranking; it stays in the book for the readout."""
        self._authorize(credentials, "admin", "/admin/experiments")
        stopped = await asyncio.to_thread(stop_experiment, self._redis, self.store.keys.experiments, name)
        if stopped is None:
            raise HTTPException(404, detail=f"no experiment {name!r}")
        self.book.refresh()
        return {"name": name, "status": stopped.status}

    @app.get("/experiments/{name}/report", responses={**KEYED, 404: {"description": "no sink data configured"},
                                                     503: RETRY_LATER})
    async def experiment_report(self, name: str = Path(pattern=EXPERIMENT_NAME),
                                credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """The readout of an experiment from the sink's Parquet (rerank.experiments.readout). Admin scope."""
        from rerank.experiments.readout import load_parquet, report

        self._authorize(credentials, "admin", "/experiments/report")
        if not self.settings.sink_dir:
            raise HTTPException(404, detail="this app runs without a sink (set sink.enabled and sink.out_dir)")
        spec = next((e.spec for e in self.book.experiments if e.name == name), None)
        weights = {arm: a.weight for arm, a in spec.arms.items()} if spec is not None and spec.type == "ab" else None

        def readout() -> dict:  # with the book's weights: the sample ratio check
            return report(name, *load_parquet(self.settings.sink_dir, experiment=name), weights=weights)

        try:  # the model-check threads: a long read never holds the Redis calls' pool
            return await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._model_checks, readout), timeout=REPORT_TIMEOUT_S)
        except asyncio.TimeoutError:
            return _unavailable(f"the readout took over {REPORT_TIMEOUT_S:g} s (use `rerank experiment report` "
                                "on the sink directory)", self.settings.retry_after_s)

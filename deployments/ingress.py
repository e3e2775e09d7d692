"""Ingress: the Serve deployment behind the app's FastAPI HTTP surface (deployments/routes/).

The routes, one APIRouter per concern, live in deployments/routes/ (rank: POST /rank and
/events; health: GET /healthz and /model; admin: rollback, trainer, sink; experiments: the book
and the readout) and reach this class's replica through a dependency (routes/common.Replica).
This module holds the replica's state and handles, `authorize`, and the /rank batch queue.

/rank requests are collected by a serve.batch queue (`_rank_batch`); each batch then takes
ONE handle call per hop, by layout:
- inline: features (rerank.serving.pipeline.FeatureFetcher, Redis in a worker thread) and ranking
  (rerank.serving.pipeline.rank_batch) run here; the only hop is Scorer.score(list);
- fused (CPU-only apps): as inline, but without any hop: this replica holds the models itself
  (rerank.serving.models.ModelPool: registry poll and hot swap, experiment arms' models) and runs
  one forward pass per model per batch on its own forward thread, never on the event loop;
- split: FeatureFetch.fetch(list) -> Scorer.score_features(...) -> Ranker.rank(...), chained
  DeploymentResponses; the ingress awaits only the last.
The batch wait adapts to load: a request that arrives alone goes at once (wait 0), under
concurrency the configured wait lets batches form. How a request is ranked in its experiment
arm (its RankPlan) is a pure function of it: rerank.serving.planning.

Safety: every route but /healthz needs an API key with its scope when keys are configured
(rerank.serving.auth), checked by the KeyGate middleware (routes/common.py) from the headers
before the body is read: 401 / 403, then the key's rate limit (429 + Retry-After); /docs and
/openapi.json need the admin key unless `docs`. A key bound to a tenant (user_prefix) may name
only its tenant's users in /rank and /events (403). A build without keys needs allow_no_auth
(deployments/app.py). Event writes that hold an event without event_id go through a store client
that never re-sends a timed-out command (no marker would catch the duplicate).
One request never fails another of its batch: a request whose ranking fails gets its own 500,
a scorer that fails or times out gives every request of the batch a popularity ranking flagged
`degraded` (inline and fused layouts; fused: a forward pass that fails or takes longer than
score_timeout_s), and over `max_in_flight` requests the ingress answers 503 with Retry-After at
once instead of queueing. Bodies over
MAX_BODY_BYTES get 413 before they are parsed. Error bodies name no secrets. The experiment
readout (a Parquet scan) runs on the EventSink replica, never here.
"""

import asyncio
import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import redis
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.metrics import ServingMetrics
from deployments.routes import admin, experiments, health, rank
from deployments.routes.common import BodyLimit, KeyGate, Recent, resolve, unavailable, validation_error
from deployments.scorer import model_off_loop
from rerank.serving.api import DEFAULT_MAX_CATALOGUE_ITEMS, EventTsBounds, RankRequest, configure_event_ts
from rerank.infra.redact import redact
from rerank.serving.auth import ApiKeys, AuthError, RateLimiter, Scope
from rerank.experiments.attribution import AttributionConfig, ImpressionLog
from rerank.experiments.book import Assignment, LiveBook
from rerank.store.events import Event
from rerank.store.feature_store import FeatureStore
from rerank.store.keys import DEFAULT_PREFIX
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
from rerank.serving.item_cache import ItemCache
from rerank.serving.models import ModelPool
from rerank.serving.planning import attributed_event, rank_plan
from rerank.serving.scoring import ScoreInput

logger = logging.getLogger("ray.serve")
SPLIT_CHAIN_TIMEOUTS = 3  # the split layout's three chained hops get score_timeout_s each
RECENT_S = 1.0  # /healthz's trainer stats and /model's freshness (stream counts) at most this often per replica
LAYOUTS = ("inline", "split", "fused")

app = FastAPI(
    title="rerank",
    description="Real-time personalized re-ranking: POST /rank a user's candidates, POST /events behaviour.",
    version="0.2.0",
)
app.add_middleware(BodyLimit)
app.add_middleware(KeyGate)  # added last = outermost: the key is checked before BodyLimit or FastAPI read the body
app.add_exception_handler(RequestValidationError, validation_error)
for _routes in (rank, health, admin, experiments):  # before @serve.ingress below: it freezes a copy of `app`
    app.include_router(_routes.router)


@dataclass
class IngressSettings:
    redis_url: str
    prefix: str = DEFAULT_PREFIX
    layout: str = "inline"  # inline | split | fused (see the module docstring)
    model: str | None = None  # where the catalogue comes from (as the scorer's model)
    registry_uri: str | None = None  # the registry the scorer follows; POST /admin/rollback moves it
    registry_poll_s: float = 0.2  # fused: how often this replica's models poll the registry
    torch_threads: int = 1  # fused: torch's intra-op threads in this replica (as the Scorer's)
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
    docs: bool = False  # with keys: /docs and /openapi.json open to anyone (else the admin key's)
    location_roots: tuple[str, ...] = ()  # where experiment arms' models may be (empty: nowhere)
    experiments_refresh_s: float = 1.0  # how soon a changed experiment book reaches this replica
    arm_trainers: tuple[str, ...] = ()  # "experiment/arm" of the arms whose own trainer the app runs
    record_impressions: bool = True
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    event_ttl_s: int = 6 * 3600  # how long a duplicate event_id is recognised
    max_bought: int = 500  # purchased items kept per user
    event_ts_bounds: EventTsBounds = field(default_factory=EventTsBounds)  # the range of an event's ts
    item_cache_ttl_s: float = 1.0  # how old this replica's cached item counters may be (0 = off)


def event_store(events: list[Event], retrying: FeatureStore, once: FeatureStore) -> FeatureStore:
    """`once` (a client that never re-sends a command: retries=0) when any event has no event_id:
    such an event has no idempotency marker, so a write re-sent after a timeout (the server may have
    run the first one) would store it twice. Else `retrying`: a re-sent event with an event_id is a
    duplicate that its marker drops, and the retry rides out a pooled connection that died."""
    return retrying if all(e.event_id is not None for e in events) else once


@dataclass
class _Pending:
    request: RankRequest
    plan: RankPlan
    assignment: Assignment
    request_id: str
    arrived: float


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256,
                  max_queued_requests=128)  # beyond: Serve answers 503 before the hop
@serve.ingress(app)
class Ingress:
    """One replica's state and handles (the routes in deployments/routes/ use them) and its
    /rank batch queue. `sink`: the EventSink, which also runs the experiment readouts."""

    def __init__(self, scorer: DeploymentHandle | None, settings: IngressSettings,
                 features: DeploymentHandle | None = None,
                 ranker: DeploymentHandle | None = None, trainer: DeploymentHandle | None = None,
                 arm_trainers: dict[str, DeploymentHandle] | None = None, sink: DeploymentHandle | None = None) -> None:
        if settings.layout not in LAYOUTS:
            raise ValueError(f"layout {settings.layout!r}: expected one of {', '.join(LAYOUTS)}")
        if settings.layout == "split" and (features is None or ranker is None):
            raise ValueError("layout split needs the FeatureFetch and Ranker handles")
        if settings.layout != "fused" and scorer is None:
            raise ValueError(f"layout {settings.layout} needs the Scorer handle")
        self.scorer = scorer
        self.feature_fetch = features
        self.ranker = ranker
        self.trainer = trainer
        self.arm_trainers = arm_trainers or {}  # "experiment/arm" -> that arm's own OnlineTrainer
        self.sink = sink
        self.settings = settings
        store_config = dict(prefix=settings.prefix, item_capacity=settings.item_capacity,
                            new_item_rate_per_min=settings.new_item_rate_per_min, event_ttl_s=settings.event_ttl_s,
                            max_bought=settings.max_bought)
        self.store = FeatureStore(settings.redis_url, **store_config)
        # writes holding an event without event_id: a client that never re-sends (see event_store)
        self.store_once = FeatureStore(settings.redis_url, retries=0, **store_config)
        configure_event_ts(settings.event_ts_bounds)  # /events bodies are validated against them
        self.catalogue = serving_catalogue(settings.model, settings.registry_uri, self.store,
                                           settings.catalogue_refresh_s)
        if settings.layout in ("inline", "fused"):
            self.fetcher = FeatureFetcher(self.store, self.catalogue, settings.history_len,
                                          item_cache=ItemCache(ttl_s=settings.item_cache_ttl_s))
        self.models: ModelPool | None = None  # fused: the models this replica scores with itself
        if settings.layout == "fused":
            self.models = ModelPool(settings.model, settings.registry_uri, settings.registry_poll_s,
                                    settings.history_len, torch_threads=settings.torch_threads, logger=logger,
                                    label="fused ingress")
            # one forward pass at a time, like the Scorer's batch queue, on a thread of its own: never
            # the event loop, nor the default pool that the Redis calls of /rank and /events use
            self.forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fused-forward")
        self.metrics = ServingMetrics()
        self.rate_limiter = RateLimiter()  # per key name, per replica (ApiKeys.rate_of; KeyGate applies it)
        self.recent = Recent(RECENT_S)  # counts of stream entries (trainer lag, freshness): once a second at most
        self._in_flight = 0
        self._model_versions: dict[str, str] = {}  # model key -> last version it answered with (degraded answers)
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.book = LiveBook(self.redis, self.store.keys.experiments, settings.experiments_refresh_s)
        self.impressions = ImpressionLog(self.redis, self.store.keys, settings.attribution)
        # arm model checks and registry reads (rollback) may take long: their own threads, never the
        # event loop's default pool that the Redis calls of /rank and /events use
        self.model_checks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="slow-admin")
        # the batch queue is built per replica so that every knob comes from the app's args
        self._rank_batch = serve.batch(
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=settings.batch_wait_s,
            max_concurrent_batches=settings.max_concurrent_batches,
        )(self._rank_many)

    def authorize(self, credentials: HTTPAuthorizationCredentials | None, scope: Scope, route: str) -> str:
        """The key's name, or the 401 / 403 HTTPException (counted under `route`)."""
        header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
        try:
            return self.settings.keys.authorize(header, scope)
        except AuthError as err:
            self.metrics.requests.inc(tags={"route": route, "status": str(err.status)})
            raise HTTPException(err.status, detail=err.message, headers=err.headers) from None

    def check_user(self, name: str, user_id: str, route: str, where: str = "") -> None:
        """403 HTTPException when the key `name` is bound to a tenant (user_prefix) that `user_id`
        is outside of (counted under `route`); `where` prefixes the message (e.g. "events[3]: ")."""
        try:
            self.settings.keys.check_user(name, user_id)
        except AuthError as err:
            self.metrics.requests.inc(tags={"route": route, "status": str(err.status)})
            raise HTTPException(err.status, detail=f"{where}{err.message}") from None

    def event_store(self, events: list[Event]) -> FeatureStore:
        """The store to write `events` with (see `event_store`)."""
        return event_store(events, self.store, self.store_once)

    # ------------------------------------------------------------------ /rank
    @property
    def in_flight(self) -> int:
        """/rank requests inside this replica now (waiting for or in a batch)."""
        return self._in_flight

    async def rank_one(self, body: RankRequest) -> JSONResponse:
        """One admitted /rank request: its arm and plan, then its answer through the batch queue."""
        assignment = self.book.assign(body.user_id)
        request_id = uuid.uuid4().hex
        plan = rank_plan(body, assignment, request_id, models=self.settings.layout != "split")
        self._in_flight += 1
        if self.settings.adaptive_wait:  # alone: no point waiting for company
            self._rank_batch.set_batch_wait_timeout_s(self.settings.batch_wait_s if self._in_flight > 1 else 0.0)
        try:
            return await self._rank_batch(_Pending(body, plan, assignment, request_id, time.perf_counter()))
        finally:
            self._in_flight -= 1

    async def model_info(self, timeout_s: float) -> dict:
        """What GET /model and /healthz report: the fused replica's own model, else a Scorer
        replica's (an exception when it does not answer within `timeout_s`)."""
        if self.models is not None:
            return self.models.current_version()
        return await asyncio.wait_for(resolve(self.scorer.current_version.remote()), timeout=timeout_s)

    async def _forward(self, inputs: list[ScoreInput], model_key: str) -> ScoredBatch:
        """fused: one forward pass in this replica (an arm's model loaded first, off the event loop)."""
        await model_off_loop(self.models, model_key)
        return await asyncio.get_running_loop().run_in_executor(self.forward, self.models.score, model_key, inputs)

    async def _scores(self, fetched, model_key: str, indices: list[int]) -> ModelScores:
        """The scores of the requests `indices` of an inline or fused batch by one model (the
        scorer's answer, or this replica's forward pass), or NaN scores (popularity ranking,
        degraded) when that fails or takes longer than score_timeout_s."""
        try:
            inputs = fetched.score_inputs(indices)
            call = resolve(self.scorer.score.remote(inputs, model_key)) if self.models is None else \
                self._forward(inputs, model_key)
            scored = await asyncio.wait_for(call, timeout=self.settings.score_timeout_s)
            self._model_versions[model_key] = scored.model_version
        except Exception as err:  # timeout, dead replica, unloadable arm model ...: rank without the model
            logger.warning("%s failed (%s): degraded ranking for %d requests",
                           "scorer call" if self.models is None else "forward pass", type(err).__name__, len(indices))
            nan = [np.full(len(fetched.items[i].candidate_ids), np.nan, dtype=np.float32) for i in indices]
            scored = ScoredBatch(nan, self._model_versions.get(model_key, "none"), len(indices), 0.0, degraded=True)
        return ModelScores(indices, scored)

    async def _ranked(self, batch: list[_Pending]) -> RankedBatch:
        """Features, scores and ranking of one batch, one handle call per hop of the layout (inline:
        one scorer call per model the batch's experiment arms need, concurrently; fused: one
        forward pass per model here, no hop)."""
        requests = [(p.request.user_id, p.request.candidates) for p in batch]
        plans = [p.plan for p in batch]
        if self.settings.layout in ("inline", "fused"):
            fetched = await asyncio.to_thread(self.fetcher.fetch, requests)  # never block the event loop
            groups = score_groups(plans)
            answers = await asyncio.gather(*(self._scores(fetched, key, idx) for key, idx in groups.items()))
            return rank_batch(fetched, dict(zip(groups, answers)), plans, self.catalogue)
        # split: chained calls, results travel between replicas by reference; one await per batch,
        # bounded (a hop that hangs gives the batch a retryable 503, not a wait without end)
        fetched = self.feature_fetch.fetch.remote(requests)
        scored = self.scorer.score_features.remote(fetched)
        ranked = self.ranker.rank.remote(fetched, scored, plans)
        return await asyncio.wait_for(resolve(ranked), timeout=SPLIT_CHAIN_TIMEOUTS * self.settings.score_timeout_s)

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
            return [unavailable("ranking unavailable", self.settings.retry_after_s) for _ in batch]
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
    def attributed(self, events: list) -> list[Event]:
        """Events with their attribution fields: the impression that showed the item (by request_id,
        else the user's latest within the window), or else the user's current assignment."""
        found = self.impressions.attribute([(e.user_id, e.item_id, e.request_id) for e in events])
        for how, count in Counter(hit.how or "none" for hit in found).items():
            self.metrics.attributed.inc(count, tags={"how": how})
        return [attributed_event(e, hit, None if hit.how else self.book.assign(e.user_id))
                for e, hit in zip(events, found)]

    def __del__(self) -> None:
        if getattr(self, "models", None) is not None:  # fused: its registry poll thread ends
            self.models.close()

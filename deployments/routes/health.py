"""Health and model info: GET /healthz (no key) and GET /model.

Both report how far behind the stream something is (the trainer's lag, the served weights'
events_behind_head), which costs a count of stream entries: each replica asks at most once per
Ingress.recent's ttl (1 s; callers in between share the last answer), and a count of LAG_CAP or
more is reported as ">= LAG_CAP", so a flood of the key-less /healthz cannot make Redis or the
trainer count ten thousand entries per call."""

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import Field

from deployments.routes.common import KEYED, RETRY_LATER, Replica, bearer, resolve, unavailable
from rerank.infra.redact import redact
from rerank.serving import api
from rerank.serving.api import ModelInfo

LAG_CAP = 1000  # stream entries counted at most per lag; more is reported as ">= 1000"
router = APIRouter()


class HealthResponse(api.HealthResponse):
    """rerank.serving.api.HealthResponse and `auth` (the field belongs there; kept here while
    that module is being changed elsewhere)."""

    auth: Literal["on", "off"] = Field(description="on: API keys are required (every route but /healthz); off: "
                                       "the app was started without keys (allow_no_auth): every route is open")


def capped(count):
    """A stream count as reported: the number, or ">= LAG_CAP" when the count stopped there."""
    return f">= {LAG_CAP}" if isinstance(count, int) and count >= LAG_CAP else count


async def _trainer_stats(ingress) -> dict:
    return await asyncio.wait_for(resolve(ingress.trainer.stats.remote()), timeout=2.0)


@router.get("/healthz", response_model=HealthResponse,
            responses={503: {"model": HealthResponse, "description": "no model loaded"}})
async def healthz(ingress: Replica):
    """Is Redis reachable, is a model loaded, what is the trainer doing? 200 (ok or degraded),
    503 without a model. A stuck scorer or trainer never hangs it (2 s bounds). No key needed.
    The trainer's state and lag are at most a second old."""
    redis_ok = await asyncio.to_thread(ingress.store.ping)
    try:
        version = (await ingress.model_info(timeout_s=2.0))["version"]
    except Exception:
        version = None
    trainer = None
    if ingress.trainer is not None:
        try:
            stats = await ingress.recent.get("trainer", lambda: _trainer_stats(ingress))
            trainer = {k: stats.get(k) for k in ("state", "version", "lag_events", "error_at")}
            trainer["lag_events"] = capped(trainer["lag_events"])
            trainer["error"] = redact(stats["error"]) if stats.get("error") else None
        except Exception as err:
            trainer = {"state": "unreachable", "error": type(err).__name__}
    health = HealthResponse(
        status="ok" if redis_ok and version else "degraded",
        redis=bool(redis_ok),
        model_loaded=version is not None,
        model_version=version,
        trainer=trainer,
        auth="on" if ingress.settings.keys.enabled else "off",
    )
    return JSONResponse(health.model_dump(), status_code=200 if version else 503)


@router.get("/model", response_model=ModelInfo, responses={**KEYED, 503: RETRY_LATER})
async def model(ingress: Replica, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ModelInfo:
    """The weights a scorer replica (layout fused: this ingress replica) serves: version, source,
    loaded_at, trained_until, meta; and their freshness (at most a second old; events_behind_head
    counted up to 1000, more is ">= 1000")."""
    from rerank.online.freshness import model_freshness

    ingress.authorize(credentials, "rank", "/model")
    try:
        info = await ingress.model_info(timeout_s=5.0)
    except Exception:  # a stuck or restarting scorer: say so, do not hang the client
        return unavailable("scorer unavailable", ingress.settings.retry_after_s)
    meta, loaded_at = info.get("meta") or {}, info.get("loaded_at")
    freshness = await ingress.recent.get(
        ("freshness", info.get("version"), loaded_at, meta.get("trained_until_id")),
        lambda: asyncio.to_thread(model_freshness, meta, loaded_at, ingress.redis, ingress.store.keys.events,
                                  limit=LAG_CAP))
    info["freshness"] = {**freshness, "events_behind_head": capped(freshness.get("events_behind_head"))}
    return ModelInfo(**info)

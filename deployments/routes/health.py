"""Health and model info: GET /healthz (no key) and GET /model."""

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

from deployments.routes.common import KEYED, RETRY_LATER, Replica, bearer, resolve, unavailable
from rerank.infra.redact import redact
from rerank.serving.api import HealthResponse, ModelInfo

router = APIRouter()


@router.get("/healthz", response_model=HealthResponse,
            responses={503: {"model": HealthResponse, "description": "no model loaded"}})
async def healthz(ingress: Replica):
    """Is Redis reachable, is a model loaded, what is the trainer doing? 200 (ok or degraded),
    503 without a model. A stuck scorer or trainer never hangs it (2 s bounds). No key needed."""
    redis_ok = await asyncio.to_thread(ingress.store.ping)
    try:
        version = (await ingress.model_info(timeout_s=2.0))["version"]
    except Exception:
        version = None
    trainer = None
    if ingress.trainer is not None:
        try:
            stats = await asyncio.wait_for(resolve(ingress.trainer.stats.remote()), timeout=2.0)
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


@router.get("/model", response_model=ModelInfo, responses={**KEYED, 503: RETRY_LATER})
async def model(ingress: Replica, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ModelInfo:
    """The weights a scorer replica (layout fused: this ingress replica) serves: version, source,
    loaded_at, trained_until, meta."""
    from rerank.online.freshness import model_freshness

    ingress.authorize(credentials, "rank", "/model")
    try:
        info = await ingress.model_info(timeout_s=5.0)
    except Exception:  # a stuck or restarting scorer: say so, do not hang the client
        return unavailable("scorer unavailable", ingress.settings.retry_after_s)
    info["freshness"] = await asyncio.to_thread(
        model_freshness, info.get("meta") or {}, info.get("loaded_at"), ingress.settings.redis_url,
        ingress.store.keys.events)
    return ModelInfo(**info)

"""Admin of online learning and the sink: POST /admin/rollback, GET /admin/trainer, GET /admin/sink."""

import asyncio

from fastapi import APIRouter, Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials
from ray.serve.handle import DeploymentHandle

from deployments.routes.common import KEYED, UNPARSABLE, Replica, bearer, resolve
from rerank.infra.redact import redact
from rerank.serving.api import RollbackRequest

router = APIRouter()


async def _trainer_stats(trainer: DeploymentHandle) -> dict:
    stats = await asyncio.wait_for(resolve(trainer.stats.remote()), timeout=5.0)
    stats["error"] = redact(stats["error"]) if stats.get("error") else None
    return stats


@router.post("/admin/rollback", responses={**KEYED, 400: UNPARSABLE, 404: {"description": "no such version"},
                                           409: {"description": "the app has no registry"}})
async def admin_rollback(ingress: Replica, body: RollbackRequest,
                         credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
    """Point the registry's LATEST at `version` and pin it (or `unpin: true` to release the pin);
    the scorers follow within a poll interval. Needs the admin scope."""
    from rerank.models.registry import ModelRegistry, RegistryError

    ingress.authorize(credentials, "admin", "/admin/rollback")
    if not ingress.settings.registry_uri:
        raise HTTPException(409, detail="the app has no registry_uri; nothing to roll back")
    registry = ModelRegistry(ingress.settings.registry_uri)
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


@router.get("/admin/trainer", responses={**KEYED, 404: {"description": "the app runs without a trainer"}})
async def admin_trainer(ingress: Replica, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
    """The online trainer's counters, state, lag and event -> publish delays. Needs the admin scope."""
    ingress.authorize(credentials, "admin", "/admin/trainer")
    if ingress.trainer is None and not ingress.arm_trainers:
        raise HTTPException(404, detail="this app runs without an online trainer")
    stats = await _trainer_stats(ingress.trainer) if ingress.trainer is not None else {}
    if ingress.arm_trainers:  # experiment arms' own trainers
        stats["arms"] = {arm: await _trainer_stats(handle) for arm, handle in ingress.arm_trainers.items()}
    return stats


@router.get("/admin/sink", responses={**KEYED, 404: {"description": "the app runs without a sink"}})
async def admin_sink(ingress: Replica, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
    """The Parquet sink's state and counters. Needs the admin scope."""
    ingress.authorize(credentials, "admin", "/admin/sink")
    if ingress.sink is None:
        raise HTTPException(404, detail="this app runs without a sink")
    return await asyncio.wait_for(resolve(ingress.sink.stats.remote()), timeout=5.0)

"""Admin of online learning and the sink: POST /admin/rollback, GET /admin/trainer, GET /admin/sink.

A rollback reads and writes the model registry (a local directory or an object store such as S3):
all of it, the registry's construction included, runs on the replica's slow-admin threads
(Ingress.model_checks) within ROLLBACK_TIMEOUT_S, never on the event loop nor on the default pool
that the Redis calls of /rank and /events use; a registry that does not answer in time is a 503."""

import asyncio

from fastapi import APIRouter, Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials
from ray.serve.handle import DeploymentHandle

from deployments.routes.common import KEYED, RETRY_LATER, UNPARSABLE, Replica, bearer, resolve, unavailable
from rerank.infra.redact import redact
from rerank.serving.api import RollbackRequest

ROLLBACK_TIMEOUT_S = 10.0  # the registry's reads and writes of one POST /admin/rollback; longer is a 503
router = APIRouter()


def _move_pointer(registry_uri: str, body: RollbackRequest) -> dict:
    """The rollback itself, blocking (registry I/O): on a slow-admin thread."""
    from rerank.models.registry import ModelRegistry

    registry = ModelRegistry(registry_uri)
    if body.unpin:
        registry.unpin()
    else:
        registry.rollback(body.version, body.reason or "admin rollback")
    ptr = registry.pointer()
    return {"latest": ptr.version if ptr else None, "pinned": bool(ptr and ptr.pinned)}


async def _trainer_stats(trainer: DeploymentHandle) -> dict:
    stats = await asyncio.wait_for(resolve(trainer.stats.remote()), timeout=5.0)
    stats["error"] = redact(stats["error"]) if stats.get("error") else None
    return stats


@router.post("/admin/rollback", responses={**KEYED, 400: UNPARSABLE, 404: {"description": "no such version"},
                                           409: {"description": "the app has no registry"}, 503: RETRY_LATER})
async def admin_rollback(ingress: Replica, body: RollbackRequest,
                         credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
    """Point the registry's LATEST at `version` and pin it (or `unpin: true` to release the pin);
    the scorers follow within a poll interval. Needs the admin scope. 503 when the registry does
    not answer within 10 s (the change may still land: check GET /model)."""
    from rerank.models.registry import RegistryError

    ingress.authorize(credentials, "admin", "/admin/rollback")
    if not ingress.settings.registry_uri:
        raise HTTPException(409, detail="the app has no registry_uri; nothing to roll back")
    if not body.unpin and body.version is None:
        raise HTTPException(422, detail=[{"loc": ["body", "version"], "msg": "give version or unpin",
                                          "type": "value_error"}])
    call = asyncio.get_running_loop().run_in_executor(ingress.model_checks, _move_pointer,
                                                      ingress.settings.registry_uri, body)
    try:
        return await asyncio.wait_for(call, timeout=ROLLBACK_TIMEOUT_S)
    except asyncio.TimeoutError:
        return unavailable(f"the model registry did not answer within {ROLLBACK_TIMEOUT_S:g} s (the rollback may "
                           "still take effect: check GET /model)", ingress.settings.retry_after_s)
    except RegistryError as err:
        raise HTTPException(404, detail=redact(str(err))) from None


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

"""Experiment management: GET /experiments, PUT / DELETE /admin/experiments/{name},
POST /admin/experiments/{name}/archive, and the readout GET /experiments/{name}/report, which runs
on the EventSink replica (a Parquet scan never takes the serving replica's CPU or memory).

An arm's model / registry_uri must lie inside the app's location roots (`model_roots`, default the
parents of the app's model and registry; rerank.experiments.book.check_locations), checked before
anything reads it."""

import asyncio

from fastapi import APIRouter, Depends, HTTPException, Path
from fastapi.security import HTTPAuthorizationCredentials

from deployments.routes.common import KEYED, RETRY_LATER, UNPARSABLE, Replica, bearer, resolve, unavailable
from rerank.experiments.book import (
    EXPERIMENT_NAME,
    ExperimentSpec,
    archive_experiment,
    check_locations,
    read_book,
    servable,
    stop_experiment,
    unreadable_model,
    write_experiment,
)
from rerank.infra.redact import redact
from rerank.serving.planning import readout_weights

REPORT_TIMEOUT_S = 30.0  # GET /experiments/{name}/report reads Parquet (on the sink); longer is a 503
router = APIRouter()


@router.get("/experiments", responses=KEYED)
async def experiments(ingress: Replica, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
    """The experiment book (rerank.experiments.book), in assignment order. Needs the admin scope."""
    ingress.authorize(credentials, "admin", "/experiments")
    book = await asyncio.to_thread(read_book, ingress.redis, ingress.store.keys.experiments)
    return {"experiments": {e.name: e.spec.model_dump() for e in book}}


@router.put("/admin/experiments/{name}", responses={**KEYED, 400: UNPARSABLE, 409: {
    "description": "the layout or the app cannot serve it (an arm model or registry outside the app's "
                   "model_roots, split layout with models, an online arm without its trainer, an arm model "
                   "that does not load)"}})
async def put_experiment(ingress: Replica, body: ExperimentSpec, name: str = Path(pattern=EXPERIMENT_NAME),
                         credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
    """Add or change an experiment (ramp weights, add arms); replicas follow within a second."""
    ingress.authorize(credentials, "admin", "/admin/experiments")
    # where the arms' models may be, before anything reads them (a thread: realpath can block on a hung mount)
    problem = await asyncio.to_thread(check_locations, body, ingress.settings.location_roots)
    if problem is None:
        problem = servable(name, body, ingress.settings.layout, ingress.settings.arm_trainers)
    if problem is None:  # refuse an arm whose model no scorer could load (its users would go degraded)
        try:
            check = asyncio.get_running_loop().run_in_executor(ingress.model_checks, unreadable_model, body)
            problem = await asyncio.wait_for(check, timeout=5.0)
        except asyncio.TimeoutError:
            problem = "an arm's model source did not answer within 5 s"
    if problem:
        raise HTTPException(409, detail=redact(problem))
    try:
        book = await asyncio.to_thread(write_experiment, ingress.redis, ingress.store.keys.experiments, name, body)
    except ValueError as err:
        raise HTTPException(422, detail=[{"loc": ["body", "traffic"], "msg": str(err), "type": "value_error"}])
    ingress.book.refresh()
    return {"experiments": [e.name for e in book]}


@router.delete("/admin/experiments/{name}", responses={**KEYED, 404: {"description": "no such experiment"}})
async def delete_experiment(ingress: Replica, name: str = Path(pattern=EXPERIMENT_NAME),
                            credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
    """Stop an experiment: its users get the default ranking; it stays in the book for the readout."""
    ingress.authorize(credentials, "admin", "/admin/experiments")
    stopped = await asyncio.to_thread(stop_experiment, ingress.redis, ingress.store.keys.experiments, name)
    if stopped is None:
        raise HTTPException(404, detail=f"no experiment {name!r}")
    ingress.book.refresh()
    return {"name": name, "status": stopped.status}


@router.post("/admin/experiments/{name}/archive", responses={
    **KEYED, 404: {"description": "no such experiment"},
    409: {"description": "the experiment is running: stop it first"}})
async def archive(ingress: Replica, name: str = Path(pattern=EXPERIMENT_NAME),
                  credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
    """Remove a stopped experiment from the book, freeing its traffic range (other experiments keep
    theirs, and their users); its events stay in the sink for the readout. Needs the admin scope."""
    ingress.authorize(credentials, "admin", "/admin/experiments")
    try:
        archived = await asyncio.to_thread(archive_experiment, ingress.redis, ingress.store.keys.experiments, name)
    except ValueError:
        raise HTTPException(409, detail=f"experiment {name!r} is running: stop it first "
                            f"(DELETE /admin/experiments/{name})") from None
    if archived is None:
        raise HTTPException(404, detail=f"no experiment {name!r}")
    ingress.book.refresh()
    return {"name": name, "archived": True}


@router.get("/experiments/{name}/report", responses={**KEYED, 404: {"description": "no sink data configured"},
                                                    503: RETRY_LATER})
async def experiment_report(ingress: Replica, name: str = Path(pattern=EXPERIMENT_NAME),
                            credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
    """The readout of an experiment from the sink's Parquet (rerank.experiments.readout). Admin scope."""
    ingress.authorize(credentials, "admin", "/experiments/report")
    if ingress.sink is None:
        raise HTTPException(404, detail="this app runs without a sink (set sink.enabled and sink.out_dir)")
    spec = next((e.spec for e in ingress.book.experiments if e.name == name), None)
    try:  # with the book's weights: the sample ratio check; the scan runs on the EventSink replica
        call = ingress.sink.report.remote(name, readout_weights(spec))
        return await asyncio.wait_for(resolve(call), timeout=REPORT_TIMEOUT_S)
    except asyncio.TimeoutError:
        return unavailable(f"the readout took over {REPORT_TIMEOUT_S:g} s (use `rerank experiment report` "
                           "on the sink directory)", ingress.settings.retry_after_s)

"""The hot path: POST /rank (into the Ingress' batch queue) and POST /events (Redis, attributed)."""

import asyncio

import redis
from fastapi import APIRouter, Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials

from deployments.routes.common import KEYED, RETRY_LATER, UNPARSABLE, Replica, bearer, limit_error, unavailable
from rerank.serving.api import EventsRequest, EventsResponse, RankRequest, RankResponse, RequestLimitError, check_rank_limits
from rerank.store.errors import FeatureStoreUnavailable

router = APIRouter()


@router.post("/rank", response_model=RankResponse,
             responses={**KEYED, 400: UNPARSABLE, 413: {"description": "body over 1 MiB"}, 503: RETRY_LATER})
async def rank(ingress: Replica, body: RankRequest,
               credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
    """Re-rank `candidates` (or the whole catalogue) for `user_id`."""
    name = ingress.authorize(credentials, "rank", "/rank")
    ingress.check_user(name, body.user_id, "/rank")  # a tenant's key ranks its own users only
    settings = ingress.settings
    try:
        check_rank_limits(body, settings.max_candidates, catalogue_size=ingress.catalogue.current.n_items,
                          max_catalogue=settings.max_catalogue_items)
    except RequestLimitError as err:
        ingress.metrics.requests.inc(tags={"route": "/rank", "status": "422"})
        raise limit_error(err) from None
    if ingress.in_flight >= settings.max_in_flight:  # shed now rather than queue without bound
        ingress.metrics.requests.inc(tags={"route": "/rank", "status": "503"})
        return unavailable("overloaded", settings.retry_after_s)
    response = await ingress.rank_one(body)
    ingress.metrics.requests.inc(tags={"route": "/rank", "status": str(response.status_code)})
    return response


@router.post("/events", response_model=EventsResponse,
             responses={**KEYED, 400: UNPARSABLE, 413: {"description": "body over 1 MiB"}, 503: RETRY_LATER})
async def events(ingress: Replica, body: EventsRequest,
                 credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
    """Store behaviour events: one atomic Redis step each, one round trip for the request."""
    name = ingress.authorize(credentials, "events", "/events")
    for i, event in enumerate(body.events):  # a tenant's key writes its own users' history only; before any write
        ingress.check_user(name, event.user_id, "/events", f"events[{i}]: ")
    metrics = ingress.metrics
    try:
        events = await asyncio.to_thread(ingress.attributed, body.events)
        tenant = ingress.settings.keys.tenant_of(name)  # one tenant's event_id never marks another's event
        for event in events:
            event.marker_scope = tenant
        # events without event_id: a client that never re-sends a timed-out write (no marker to drop a copy)
        written = await asyncio.to_thread(ingress.event_store(events).write_events_detailed, events)
    except (FeatureStoreUnavailable, redis.RedisError):
        metrics.requests.inc(tags={"route": "/events", "status": "503"})
        return unavailable("feature store unavailable, events not stored", ingress.settings.retry_after_s)
    except ValueError as err:
        metrics.requests.inc(tags={"route": "/events", "status": "422"})
        raise HTTPException(422, detail=[{"loc": ["body", "events"], "msg": str(err), "type": "value_error"}])
    applied = written.applied
    accepted = sum(applied)
    for result, count in (("stored", accepted), ("duplicate", len(applied) - accepted),
                          ("new_item", written.new_items), ("over_item_capacity", written.over_capacity),
                          ("over_new_item_rate", written.over_rate)):
        if count:  # Ray counters refuse inc(0)
            metrics.events.inc(count, tags={"result": result})
    metrics.requests.inc(tags={"route": "/events", "status": "200"})
    return EventsResponse(accepted=accepted, duplicates=len(applied) - accepted)

"""What the Ingress' routers share: the replica dependency, the API key scheme, error bodies,
OpenAPI response docs, the body size middleware and the 422 handler."""

# No `from __future__ import annotations` in the route modules: FastAPI reads their signatures at
# runtime, and a string annotation it cannot resolve turns the request body into a query parameter.
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from ray import serve

from rerank.serving.api import MAX_BODY_BYTES, RequestLimitError

bearer = HTTPBearer(auto_error=False, description="API key: Authorization: Bearer <key>")

RETRY_LATER = {"description": "overloaded or a dependency unavailable: nothing was done; retry",
               "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}}
UNPARSABLE = {"description": "the body is not UTF-8 text (FastAPI cannot parse it)"}
KEYED = {401: {"description": "API key missing, malformed or unknown"},
         403: {"description": "the API key lacks this route's scope"}}


async def current_ingress() -> Any:
    """The Ingress replica serving this request: what Serve itself injects as `self` into the
    routes of a class (its replica context's servable object). Async: no threadpool hop."""
    return serve.get_replica_context().servable_object


# a route's first parameter, `ingress: Replica`: the deployments.ingress.Ingress instance
Replica = Annotated[Any, Depends(current_ingress)]


async def resolve(response):
    """Await a DeploymentResponse inside a coroutine (so asyncio.wait_for can bound it)."""
    return await response


def unavailable(what: str, retry_after_s: int) -> JSONResponse:
    """503 with Retry-After: nothing was done, retry."""
    return JSONResponse({"detail": f"{what}; retry"}, status_code=503, headers={"Retry-After": str(retry_after_s)})


def limit_error(err: RequestLimitError) -> HTTPException:
    """422 naming the body field over its limit (FastAPI's validation error shape)."""
    return HTTPException(422, detail=[{"loc": ["body", err.field], "msg": err.message, "type": "value_error"}])


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


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field: loc, msg and type only. FastAPI's default echoes the input,
    which cannot even be rendered when it is a non-finite number (it became a 500)."""
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)

"""What the Ingress' routers share: the replica dependency, the API key scheme, error bodies,
OpenAPI response docs, the key gate and body size middlewares, the 422 handler, and `Recent`
(a short-lived cache of one slow answer, e.g. the trainer's lag for /healthz).

Order of a request through the middlewares: KeyGate (the API key of the route's scope, then the
key's rate limit: 401 / 403 / 429 before a byte of the body is read), BodyLimit (413), then FastAPI
(parsing, validation: 422, the route)."""

# No `from __future__ import annotations` in the route modules: FastAPI reads their signatures at
# runtime, and a string annotation it cannot resolve turns the request body into a query parameter.
import asyncio
import inspect
import math
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from ray import serve

from rerank.serving.api import MAX_BODY_BYTES, RequestLimitError
from rerank.serving.auth import AuthError, Scope

bearer = HTTPBearer(auto_error=False, description="API key: Authorization: Bearer <key>")

RETRY_LATER = {"description": "overloaded or a dependency unavailable: nothing was done; retry",
               "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}}
UNPARSABLE = {"description": "the body is not UTF-8 text (FastAPI cannot parse it)"}
KEYED = {401: {"description": "API key missing, malformed or unknown (answered before the body is read)"},
         403: {"description": "the API key lacks this route's scope (or, on /rank and /events, names a user "
                              "outside the key's tenant, its user_prefix)"},
         429: {"description": "this API key is over its rate limit (rate_per_s, burst): nothing was done",
               "headers": {"Retry-After": {"description": "seconds until a request is allowed again",
                                           "schema": {"type": "integer"}}}}}
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


async def current_ingress() -> Any:
    """The Ingress replica serving this request: what Serve itself injects as `self` into the
    routes of a class (its replica context's servable object). Async: no threadpool hop."""
    return serve.get_replica_context().servable_object


# a route's first parameter, `ingress: Replica`: the deployments.ingress.Ingress instance
Replica = Annotated[Any, Depends(current_ingress)]


async def replica_of(scope) -> Any:
    """The Ingress replica for a middleware: what the `Replica` dependency gives the routes (the
    app's dependency_overrides included, so a test can hand both the same object)."""
    app = scope.get("app")
    provider = (getattr(app, "dependency_overrides", None) or {}).get(current_ingress, current_ingress)
    found = provider()
    return await found if inspect.isawaitable(found) else found


def route_path(scope) -> str:
    """The request's path below the app's route_prefix (Serve sets root_path), as routing sees it."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


def route_scope(path: str, docs_open: bool = False) -> tuple[Scope, str] | None:
    """The scope a path needs and its route label for metrics (the labels the routes count
    under), or None: no key needed (/healthz, /docs with `docs_open`, paths the app does not have).
    The routes' own `authorize` calls name the same scopes."""
    if path in ("/rank", "/events"):
        return path[1:], path  # type: ignore[return-value]
    if path == "/model":
        return "rank", "/model"
    if path == "/experiments":
        return "admin", "/experiments"
    if path.startswith("/experiments/"):
        return "admin", "/experiments/report"
    if path == "/admin" or path.startswith("/admin/"):
        if path.startswith("/admin/experiments/"):
            return "admin", "/admin/experiments"
        return "admin", path if path in ("/admin/rollback", "/admin/trainer", "/admin/sink") else "/admin"
    if path in DOC_PATHS and not docs_open:
        return "admin", "/docs"
    return None


class KeyGate:
    """ASGI middleware: with API keys configured, the key of the route's scope (route_scope) and
    that key's rate limit, from the headers alone: 401 / 403 (the bodies and WWW-Authenticate
    headers of ApiKeys.authorize) or 429 with Retry-After, answered without reading the body, so
    an unauthenticated request costs neither its upload nor its parsing. Auth off: it only passes
    requests on. The routes authorize again (defence in depth)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ingress = await replica_of(scope)
        keys = ingress.settings.keys
        needed = route_scope(route_path(scope), ingress.settings.docs) if keys.enabled else None
        if needed is None:
            return await self.app(scope, receive, send)
        scope_name, route = needed
        header = next((v.decode("latin-1") for k, v in scope.get("headers") or [] if k == b"authorization"), None)
        try:
            name = keys.authorize(header, scope_name)
        except AuthError as err:
            ingress.metrics.requests.inc(tags={"route": route, "status": str(err.status)})
            return await JSONResponse({"detail": err.message}, status_code=err.status, headers=err.headers)(
                scope, receive, send)
        rate, burst = keys.rate_of(name)
        wait = ingress.rate_limiter.retry_after(name, rate, burst)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            ingress.metrics.requests.inc(tags={"route": route, "status": "429"})
            return await JSONResponse(
                {"detail": f"rate limit of this API key exceeded ({rate:g} requests/s, burst {max(burst, 1.0):g}); "
                           f"retry after {seconds} s"},
                status_code=429, headers={"Retry-After": str(seconds)})(scope, receive, send)
        scope.setdefault("state", {})["api_key_name"] = name
        return await self.app(scope, receive, send)


class Recent:
    """The answer of one slow call, reused for `ttl_s` per key; callers that arrive while it runs
    share it (one call in flight per key). A failure is reused too, for the same time. At most
    `max_keys` keys are kept. Event loop only (not thread-safe)."""

    def __init__(self, ttl_s: float = 1.0, max_keys: int = 16, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_keys, self.clock = ttl_s, max_keys, clock
        self._entries: dict[Any, tuple[float, asyncio.Future]] = {}

    async def get(self, key: Any, call: Callable[[], Awaitable[Any]]) -> Any:
        now = self.clock()
        entry = self._entries.get(key)
        if entry is None or (entry[1].done() and now - entry[0] >= self.ttl_s):
            if entry is None and len(self._entries) >= self.max_keys:
                self._entries.pop(next(iter(self._entries)))
            entry = (now, asyncio.ensure_future(call()))
            entry[1].add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception never retrieved"
            self._entries[key] = entry
        return await asyncio.shield(entry[1])  # a caller that gives up leaves the call to the others


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

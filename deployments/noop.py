"""A no-op Serve deployment: the baseline `rerank bench` compares the pipeline against.

It reads and parses the request body like /rank does and answers a small JSON
object, so the difference to the pipeline is the work of the graph itself.
"""

from __future__ import annotations

import json

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse


@serve.deployment(name="Noop", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class Noop:
    """Parses the JSON body and answers {"ok": true, "n": number of top-level fields}."""

    async def __call__(self, request: Request) -> JSONResponse:
        body = await request.body()
        parsed = json.loads(body) if body else {}
        return JSONResponse({"ok": True, "n": len(parsed)})


def build_noop_app(args: dict | None = None) -> serve.Application:
    """Application builder for `serve run deployments.noop:build_noop_app`."""
    return Noop.bind()

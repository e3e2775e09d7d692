"""No-op Serve deployments: the references `rerank bench` compares the pipeline against.

- `Noop` (at /noop, the baseline): reads and parses the request body like /rank does and answers
  a small JSON object, so the difference to the pipeline is the work of the graph itself.
- `NoopHop` (at /noop-hop, the hop floor): the same, plus one handle call per request to
  `NoopScorer`, a serve.batch method that scores nothing (a float32 zero per candidate). It is
  what crossing the Scorer hop costs with no work on either side: at concurrency 1, where no
  batch forms, no layout that keeps the Scorer a deployment of its own can answer faster.
"""

from __future__ import annotations

import json

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse


@serve.deployment(name="Noop", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class Noop:
    """Parses the JSON body and answers {"ok": true, "n": number of top-level fields}."""

    async def __call__(self, request: Request) -> JSONResponse:
        body = await request.body()
        parsed = json.loads(body) if body else {}
        return JSONResponse({"ok": True, "n": len(parsed)})


@serve.deployment(name="NoopScorer", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256,
                  logging_config={"enable_access_log": False})
class NoopScorer:
    """The Scorer's shape without its work: requests batched by serve.batch, zeros back."""

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def score(self, candidates: list[np.ndarray]) -> list[np.ndarray]:
        return [np.zeros(len(c), dtype=np.float32) for c in candidates]


@serve.deployment(name="NoopHop", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class NoopHop:
    """Parses the JSON body, sends an int32 array of its candidates' length across one hop to
    NoopScorer and answers {"ok": true, "n": number of scores}."""

    def __init__(self, scorer: DeploymentHandle) -> None:
        self.scorer = scorer

    async def __call__(self, request: Request) -> JSONResponse:
        body = await request.body()
        parsed = json.loads(body) if body else {}
        candidates = parsed.get("candidates") if isinstance(parsed, dict) else None
        scores = await self.scorer.score.remote(np.zeros(len(candidates or ()), dtype=np.int32))
        return JSONResponse({"ok": True, "n": len(scores)})


def build_noop_app(args: dict | None = None) -> serve.Application:
    """Application builder for `serve run deployments.noop:build_noop_app`."""
    return Noop.bind()


def build_noop_hop_app(args: dict | None = None) -> serve.Application:
    """Application builder for `serve run deployments.noop:build_noop_hop_app`."""
    return NoopHop.bind(NoopScorer.bind())

"""The plain reference: the serving core in one process, one uvicorn worker, FastAPI, no Ray.

What a team would run instead of Ray Serve: the same Ray-free code the Ingress runs for the
inline layout, for one request at a time, behind a sync FastAPI route (FastAPI runs it on its
thread pool): `FeatureFetcher.fetch` (one Redis round trip), `score_batch` (the forward pass,
torch on this process's CPU), `rank_batch` (rules, diversity, cold start, top-k) and the
impression (one Redis round trip), answered in the service's response shape. Same Redis, same
key prefix, same model: the same rankings as the service's for the same request
(tests/test_plain_e2e.py). `rerank bench` runs it next to the Serve layouts as the `plain`
target, so every run says what Serve costs against serving the same work without it.

What it leaves out, being a reference and not a deployment: no batching across requests, no
experiments (every user is ranked in the default arm, like the service without experiments),
no registry poll (the model is loaded once: the registry's LATEST, else the model directory),
no /events, no metrics, no load shedding, no body-size limit. Auth is the service's (rerank.serving.auth: the same
keys from the environment), so a bench with --api-key needs nothing else.

    python -m rerank.serving.plain --port 8100 --redis-url redis://127.0.0.1:6379/0 \\
        --model artifacts/models/demo-shop [--registry URI] [--prefix rr:]

`build_plain_app(...)` gives the FastAPI app; `PlainServer` runs the command above as a child
process on a free port and waits until it answers (the bench's way to start it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rerank.experiments.attribution import AttributionConfig, ImpressionLog
from rerank.experiments.book import Assignment
from rerank.eventlog.records import Impression
from rerank.serving.api import (
    DEFAULT_MAX_CATALOGUE_ITEMS,
    RankRequest,
    RequestLimitError,
    check_rank_limits,
)
from rerank.serving.auth import ApiKeys, AuthError
from rerank.serving.catalogue import RefreshingCatalogue
from rerank.serving.item_cache import ItemCache
from rerank.serving.pipeline import FeatureFetcher, ModelScores, ScoredBatch, rank_batch
from rerank.serving.planning import rank_plan
from rerank.serving.scoring import score_batch
from rerank.store.feature_store import FeatureStore
from rerank.store.keys import DEFAULT_PREFIX

PLAIN_MODULE = "rerank.serving.plain"  # `python -m` of the server; CpuMeter labels its process "plain"


@dataclass
class PlainSettings:
    """The service's knobs that change a ranking or its cost (names as in the app's args)."""

    redis_url: str
    model: str | None = None  # a model directory
    registry_uri: str | None = None  # its LATEST wins over `model` (loaded once, no poll)
    redis_prefix: str = DEFAULT_PREFIX
    history_len: int = 50
    max_candidates: int = 1000
    max_catalogue_items: int | None = DEFAULT_MAX_CATALOGUE_ITEMS
    catalogue_refresh_s: float = 15.0
    record_impressions: bool = True
    attribution_window_s: float = 1800.0
    impressions_maxlen: int = 1_000_000
    impressions_max_bytes: int = 256 * 2**20
    max_impression_items: int = 100
    max_impression_bytes: int = 8192
    item_cache_ttl_s: float = 1.0
    torch_threads: int = 1  # torch's intra-op threads, as the Scorer's default
    api_keys: dict | None = None  # as the app's `api_keys`; the environment's keys count too
    extra: dict = field(default_factory=dict)  # other app args, ignored

    @classmethod
    def from_app_args(cls, args: dict) -> "PlainSettings":
        """From the app's args (serve_config.yaml's, or LocalStack.app_args()); other keys are ignored."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(**{k: v for k, v in args.items() if k in known},
                   extra={k: v for k, v in args.items() if k not in known})


class PlainRanker:
    """The model, the store and the catalogue of one process; `rank(body)` is one /rank answer."""

    def __init__(self, settings: PlainSettings) -> None:
        import redis

        from rerank.models.recommender import load_model
        from rerank.models.registry import resolve_model_dir

        if settings.torch_threads > 0:
            import torch

            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.keys = ApiKeys.load(settings.api_keys)
        self.store = FeatureStore(settings.redis_url, prefix=settings.redis_prefix)
        model_dir, version = resolve_model_dir(settings.model, settings.registry_uri)
        self.model = load_model(model_dir)
        self.model_version = f"v{version}" if version is not None else f"dir:{Path(model_dir).name}"
        self.catalogue = RefreshingCatalogue(Path(model_dir), self.store, settings.catalogue_refresh_s)
        self.fetcher = FeatureFetcher(self.store, self.catalogue, settings.history_len,
                                      item_cache=ItemCache(ttl_s=settings.item_cache_ttl_s))
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.impressions = ImpressionLog(self.redis, self.store.keys, AttributionConfig(
            window_s=settings.attribution_window_s, impressions_maxlen=settings.impressions_maxlen,
            impressions_max_bytes=settings.impressions_max_bytes, max_impression_items=settings.max_impression_items,
            max_impression_bytes=settings.max_impression_bytes))

    def check(self, body: RankRequest) -> None:
        """RequestLimitError when the request is over this server's limits (the service's)."""
        check_rank_limits(body, self.settings.max_candidates, catalogue_size=self.catalogue.current.n_items,
                          max_catalogue=self.settings.max_catalogue_items)

    def rank(self, body: RankRequest, arrived: float | None = None) -> tuple[int, dict]:
        """(status, JSON body) of one /rank answer: features, forward pass, ranking, impression."""
        arrived = time.perf_counter() if arrived is None else arrived
        assignment = Assignment()  # no experiments: the service's answer outside every experiment
        request_id = uuid.uuid4().hex
        plan = rank_plan(body, assignment, request_id)
        fetched = self.fetcher.fetch([(body.user_id, body.candidates)])
        began = time.perf_counter()
        try:
            scores = score_batch(self.model, fetched.score_inputs(), self.settings.history_len)
            scored = ScoredBatch(scores, self.model_version, 1, (time.perf_counter() - began) * 1000.0)
        except Exception:  # as the ingress: a failed forward pass ranks by popularity, degraded
            nan = [np.full(len(f.candidate_ids), np.nan, dtype=np.float32) for f in fetched.items]
            scored = ScoredBatch(nan, self.model_version, 1, 0.0, degraded=True)
        done = rank_batch(fetched, {"": ModelScores([0], scored)}, [plan], self.catalogue)
        if done.errors[0] is not None:
            return 500, {"detail": "ranking this request failed", "request_id": request_id}
        if self.settings.record_impressions:
            shown = Impression(request_id, body.user_id, assignment.experiment, assignment.arm,
                               done.model_versions[0], time.time(),
                               [(item, score, team) for (item, score), team in zip(done.items[0], done.teams[0])])
            try:
                self.impressions.record([shown])
            except Exception:  # as the ingress: a lost impression never fails the answer
                pass
        total = (time.perf_counter() - arrived) * 1000.0
        return 200, {
            "items": [{"item_id": item, "score": score} for item, score in done.items[0]],
            "model_version": done.model_versions[0],
            "feature_age_ms": done.feature_age_ms[0],
            "degraded": done.degraded[0],
            "timings_ms": {**{k: round(v, 3) for k, v in done.timings_ms.items()}, "total": round(total, 3)},
            "request_id": request_id,
            "experiment": assignment.experiment,
            "arm": assignment.arm,
            "scorer_batch_size": done.scorer_batch_size,
        }

    def health(self) -> dict:
        try:
            redis_ok = bool(self.redis.ping())
        except Exception:
            redis_ok = False
        return {"status": "ok" if redis_ok else "degraded", "redis": redis_ok, "model_version": self.model_version,
                "server": "plain"}


def build_plain_app(settings: PlainSettings | None = None, **kwargs):
    """The FastAPI app: POST /rank (sync: FastAPI's thread pool), GET /healthz. `settings`, or
    PlainSettings(**kwargs) (redis_url, model | registry_uri, redis_prefix, ...)."""
    from fastapi import FastAPI, Header
    from fastapi.responses import JSONResponse

    ranker = PlainRanker(settings if settings is not None else PlainSettings(**kwargs))
    app = FastAPI(title="rerank (plain reference)", version="0.2.0")
    app.state.ranker = ranker

    @app.post("/rank")
    def rank(body: RankRequest, authorization: str | None = Header(default=None)):
        arrived = time.perf_counter()
        try:
            ranker.keys.authorize(authorization, "rank")
        except AuthError as err:
            return JSONResponse({"detail": err.message}, status_code=err.status, headers=err.headers)
        try:
            ranker.check(body)
        except RequestLimitError as err:
            return JSONResponse({"detail": [{"loc": ["body", err.field], "msg": err.message, "type": "value_error"}]},
                                status_code=422)
        status, payload = ranker.rank(body, arrived)
        return JSONResponse(payload, status_code=status)

    @app.get("/healthz")
    def healthz():
        health = ranker.health()
        return JSONResponse(health, status_code=200 if health["redis"] else 503)

    return app


def serve_plain(settings: PlainSettings, host: str = "127.0.0.1", port: int = 8100) -> None:
    """Run the app with one uvicorn worker until interrupted (no access log)."""
    import uvicorn

    uvicorn.run(build_plain_app(settings), host=host, port=port, workers=1, log_level="warning", access_log=False)


class PlainServer:
    """`python -m rerank.serving.plain` as a child process on a free 127.0.0.1 port (dies with
    this process); `url` once `start()` returned, `stop()` ends it."""

    def __init__(self, settings: PlainSettings, port: int | None = None, log: Path | None = None) -> None:
        from rerank.infra.child_process import free_port

        self.settings = settings
        self.port = port or free_port()
        self.log = log
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, timeout_s: float = 120.0) -> "PlainServer":
        import subprocess

        import httpx

        from rerank.infra.child_process import die_with_parent

        settings = {k: v for k, v in asdict(self.settings).items() if k != "extra"}
        out = open(self.log, "w") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", PLAIN_MODULE, "--port", str(self.port),
                                          "--settings", json.dumps(settings)],
                                         stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = Path(self.log).read_text()[-2000:] if self.log else "(no log)"
                raise RuntimeError(f"plain server exited with {self.proc.returncode}: {tail}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"plain server not ready on {self.url} after {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # uvicorn: graceful shutdown on SIGTERM
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "PlainServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PLAIN_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--settings", help="PlainSettings as JSON (the flags below override it)")
    parser.add_argument("--redis-url", help="the service's Redis (default $REDIS_URL)")
    parser.add_argument("--model", help="model directory")
    parser.add_argument("--registry", help="model registry URI (its LATEST wins over --model)")
    parser.add_argument("--prefix", help=f"Redis key prefix (default {DEFAULT_PREFIX!r})")
    args = parser.parse_args(argv)
    given = json.loads(args.settings) if args.settings else {}
    for flag, name in (("redis_url", "redis_url"), ("model", "model"), ("registry", "registry_uri"),
                       ("prefix", "redis_prefix")):
        if getattr(args, flag) is not None:
            given[name] = getattr(args, flag)
    given.setdefault("redis_url", os.environ.get("REDIS_URL"))
    if not given.get("redis_url") or not (given.get("model") or given.get("registry_uri")):
        parser.error("needs --redis-url (or $REDIS_URL) and --model or --registry")
    serve_plain(PlainSettings.from_app_args(given), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())

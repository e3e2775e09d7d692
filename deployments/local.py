"""The one-machine stack behind `rerank up` and `rerank bench`: local Ray, a real Redis, the app.

`LocalStack` prepares the demo data and a model when they are missing, starts
(or reuses, via REDIS_URL / redis_url) a real Redis server, starts a local Ray
with a logical CPU count large enough for every replica, bulk-loads the feature
store, and deploys the app at `/` (and the no-op baseline at `/noop` when asked).
`stop()` tears down only what it started.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deployments.app import PROJECT_ROOT

DEMO_DATA = PROJECT_ROOT / "artifacts" / "data" / "demo-shop"
DEMO_MODEL = PROJECT_ROOT / "artifacts" / "models" / "demo-shop"
APP_NAME = "rerank"
NOOP_APP_NAME = "noop"


def ensure_demo_data(path: Path) -> Path:
    """Generate the synthetic demo shop at `path` unless a dataset is already there."""
    if not (path / "dataset.json").is_file():
        from rerank.synth import SynthConfig, write_synth

        print(f"rerank: generating the demo shop into {path} ...", file=sys.stderr)
        write_synth(path, SynthConfig())
    return path


def ensure_model(data: Path, path: Path, minutes: float = 1.0, options: dict | None = None) -> Path:
    """Train a small SASRec on `data` into `path` (about `minutes`) unless a model is there."""
    if not (path / "config.json").is_file():
        from rerank.train import train

        print(f"rerank: training a model on {data} into {path} (~{minutes:g} min) ...", file=sys.stderr)
        opts = {"epochs": 30, "max_minutes": minutes, "d_model": 64, "spare_items": 256, **(options or {})}
        train("sasrec", data, path, evaluate_valid=False, **opts)
    return path


@dataclass
class LocalStackConfig:
    data: Path | None = None  # None = the demo shop (generated when missing)
    model: Path | None = None  # None = artifacts/models/demo-shop (trained when missing)
    redis_url: str | None = None  # None = $REDIS_URL, else an embedded server owned by the stack
    host: str = "127.0.0.1"
    port: int = 8000
    num_cpus: int = 8  # logical CPUs for the local Ray (replicas reserve fractions of one)
    throughput_optimized: bool = True  # RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (measured faster here)
    with_noop: bool = False  # also deploy the no-op baseline at /noop
    train_minutes: float = 1.0
    app_args: dict = field(default_factory=dict)  # extra AppArgs (batch sizes, registry_uri, ...)
    # Continuous learning: publish the model as v1 of a registry the scorers follow and start the
    # OnlineTrainer actor on the event stream. Without app_args["registry_uri"] the registry is a
    # temporary directory of this run (its stream lives in this run's Redis, so a checkpoint must
    # not outlive it); pass a registry together with a persistent REDIS_URL to keep learning across runs.
    online: bool = False
    online_options: dict = field(default_factory=dict)  # OnlineConfig fields


class LocalStack:
    """Start with `with LocalStack(cfg) as stack:`; `stack.url` is the HTTP base URL."""

    def __init__(self, config: LocalStackConfig) -> None:
        self.config = config
        self._redis = None
        self._ray_started = False
        self._temp_registry: str | None = None
        self.trainer = None  # the OnlineTrainer actor handle when config.online
        self.redis_url: str | None = None
        self.data: Path | None = None
        self.model: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def start(self) -> "LocalStack":
        cfg = self.config
        self.data = Path(cfg.data).resolve() if cfg.data else ensure_demo_data(DEMO_DATA)
        self.model = Path(cfg.model).resolve() if cfg.model else ensure_model(self.data, DEMO_MODEL, cfg.train_minutes)
        try:
            self._start_services()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_services(self) -> None:
        cfg = self.config
        from rerank.redis_server import resolve_redis

        self.redis_url, self._redis = resolve_redis(cfg.redis_url, data_dir=None)
        print(f"rerank: Redis at {self.redis_url}{' (embedded)' if self._redis else ''}", file=sys.stderr)
        if cfg.throughput_optimized:
            os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
        import ray
        from ray import serve

        from deployments.app import build_app, ensure_loaded

        summary = ensure_loaded(self.redis_url, str(self.data), cfg.app_args.get("redis_prefix", "rr:"))
        if summary is not None:
            print(f"rerank: feature store loaded from {self.data}", file=sys.stderr)
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, namespace="rerank",
                     configure_logging=False, log_to_driver=False)
            self._ray_started = True
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        args = {"model": str(self.model), "redis_url": self.redis_url, **cfg.app_args}
        if cfg.online:
            args["registry_uri"] = self._prepare_registry(args.get("registry_uri"))
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        if cfg.online:
            from deployments.online_trainer import start_online_trainer

            self.trainer = start_online_trainer(self.redis_url, args["registry_uri"], options=cfg.online_options)
            ray.get(self.trainer.stats.remote())  # ready: checkpoint loaded, pending entries recovered
            print(f"rerank: online trainer following the event stream, publishing to {args['registry_uri']}",
                  file=sys.stderr)
        if cfg.with_noop:
            from deployments.noop import build_noop_app

            serve.run(build_noop_app(), name=NOOP_APP_NAME, route_prefix="/noop")

    def _prepare_registry(self, uri: str | None) -> str:
        """The registry the scorers follow: `uri`, or a temporary one; holds the model as v1 when empty."""
        from rerank.registry import ModelRegistry

        if uri is None:
            import tempfile

            uri = self._temp_registry = tempfile.mkdtemp(prefix="rerank-registry-")
        registry = ModelRegistry(uri)
        if registry.latest() is None:
            registry.publish_dir(self.model, {"note": f"offline model {self.model}"})
        return registry.uri

    def stop(self) -> None:
        """Stop the trainer, Serve and Ray (when this stack started Ray) and the embedded Redis."""
        try:
            import ray

            if self.trainer is not None and ray.is_initialized():
                try:  # a last checkpoint, so nothing consumed is left unacknowledged
                    ray.get(self.trainer.stop.remote(), timeout=60)
                except Exception as err:  # stopping anyway; pending entries stay in the stream
                    print(f"rerank: online trainer did not stop cleanly: {err}", file=sys.stderr)
                self.trainer = None

            if self._ray_started and ray.is_initialized():
                ray.shutdown()  # takes Serve's controller, proxy and replicas with it
                self._ray_started = False
        finally:
            if self._redis is not None:
                self._redis.close()
                self._redis = None
            if self._temp_registry is not None:
                import shutil

                shutil.rmtree(self._temp_registry, ignore_errors=True)
                self._temp_registry = None

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

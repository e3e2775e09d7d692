"""The application builder: `serve run deployments.app:build_app` or serve_config.yaml.

Graph: Ingress (FastAPI) -> FeatureFetch (Redis) -> Scorer (torch) -> Ranker.
Arguments (`AppArgs`, typed; unknown keys are refused):

- model: model directory (relative paths resolve against the project root, the
  folder with pyproject.toml, because `serve deploy` runs the builder elsewhere);
  optional when registry_uri already holds a version.
- registry_uri: ModelRegistry URI the scorer follows (hot swap), optional.
- redis_url: "redis://...", "env" ($REDIS_URL), or "embedded": a real Redis server
  owned by a detached Ray actor (single node: it binds 127.0.0.1 of the node it
  runs on; use a real Redis URL on a multi-node cluster). Its AOF data lives in
  redis_data_dir.
- data: a dataset directory bulk-loaded into the store when the store is empty.
- batching: ingress_max_batch_size / ingress_batch_wait_s (adaptive: 0 when a
  request arrives alone) / scorer_max_batch_size / scorer_batch_wait_s.
- scorer_num_gpus: GPUs per scorer replica (CUDA is used when present).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from deployments.feature_fetch import FeatureFetch
from deployments.ingress import Ingress, IngressSettings
from deployments.ranker import Ranker
from deployments.scorer import Scorer
from rerank.experiments import Variant

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# role -> Serve deployment name (what serve_config.yaml / cluster/ override per deployment)
DEPLOYMENT_NAMES = {"ingress": Ingress.name, "features": FeatureFetch.name, "scorer": Scorer.name, "ranker": Ranker.name}
APP_IMPORT_PATH = "deployments.app:build_app"


class VariantArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, gt=0)
    diversity: float | None = Field(None, ge=0, le=1)


class AppArgs(BaseModel):
    """Typed arguments of the app (the `args:` of serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None
    registry_uri: str | None = None
    registry_poll_s: float = Field(0.2, ge=0)
    redis_url: str = "embedded"
    redis_data_dir: str = str(Path.home() / ".cache" / "rerank" / "redis")
    redis_prefix: str = "rr:"
    data: str | None = None
    max_candidates: int = Field(1000, ge=1)
    history_len: int = Field(50, ge=1)
    ingress_max_batch_size: int = Field(32, ge=1)
    ingress_batch_wait_s: float = Field(0.01, ge=0)
    ingress_max_concurrent_batches: int = Field(4, ge=1)
    adaptive_wait: bool = True
    scorer_max_batch_size: int = Field(64, ge=1)
    scorer_batch_wait_s: float = Field(0.002, ge=0)
    scorer_num_gpus: float = Field(0.0, ge=0)
    scorer_num_cpus: float = Field(0.5, gt=0)
    scorer_torch_threads: int = Field(1, ge=0)
    catalogue_refresh_s: float = Field(15.0, ge=0)
    variants: dict[str, VariantArgs] = Field(default_factory=lambda: {"default": VariantArgs()})

    @model_validator(mode="after")
    def _consistent(self) -> "AppArgs":
        if not self.model and not self.registry_uri:
            raise ValueError("give `model` (a model directory) or `registry_uri`")
        if self.scorer_max_batch_size < self.ingress_max_batch_size:
            raise ValueError(
                f"scorer_max_batch_size ({self.scorer_max_batch_size}) must be >= ingress_max_batch_size "
                f"({self.ingress_max_batch_size}): one ingress batch is one scorer call"
            )
        if not self.variants:
            raise ValueError("variants must name at least one variant")
        return self


def _absolute(path: str | None) -> str | None:
    """Resolve a local path against the project root; URIs pass through."""
    if not path or "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (PROJECT_ROOT / p).resolve())


def resolve_redis_url(args: AppArgs) -> str:
    if args.redis_url == "embedded":
        from deployments.redis_owner import embedded_redis_url

        return embedded_redis_url(_absolute(args.redis_data_dir))
    if args.redis_url == "env":
        url = os.environ.get("REDIS_URL")
        if not url:
            raise ValueError("redis_url is 'env' but REDIS_URL is not set")
        return url
    return args.redis_url


def ensure_loaded(redis_url: str, data_dir: str, prefix: str) -> dict | None:
    """Bulk-load `data_dir` into the feature store when it holds no catalogue yet.

    A store that is already loaded is kept as it is (it holds online events since), after
    checking that its item ids map to the same item_idx as in `data_dir` (a sample of 100).
    """
    import numpy as np

    from rerank.dataset import load_dataset
    from rerank.feature_store import FeatureStore

    store = FeatureStore(redis_url, prefix=prefix)
    dataset = load_dataset(data_dir)
    stored_ids, _ = store.catalogue()
    if len(stored_ids) <= 1:
        return store.bulk_load(dataset, progress=False)
    sample = np.unique(np.linspace(1, dataset.n_items, num=min(100, dataset.n_items)).astype(int))
    found = store.item_index([str(i) for i in dataset.item_ids[sample]])
    if not np.array_equal(found, sample):
        raise ValueError(
            f"the feature store at {redis_url} (prefix {prefix!r}) holds another catalogue than {data_dir}: "
            f"flush it, or use another prefix / redis_data_dir"
        )
    return None


def model_dir_for_catalogue(args: AppArgs) -> str:
    """The model directory whose items.parquet seeds the in-process catalogue."""
    if args.model:
        return _absolute(args.model)
    from rerank.registry import ModelRegistry

    registry = ModelRegistry(args.registry_uri)
    version = registry.latest()
    if version is None:
        raise ValueError(f"registry {args.registry_uri} has no published version and no `model` was given")
    return str(registry.local_dir(version))


def build_app(raw_args: dict) -> serve.Application:
    """Build the graph from `raw_args` (validated into AppArgs)."""
    args = AppArgs.model_validate(raw_args or {})
    redis_url = resolve_redis_url(args)
    model_dir = model_dir_for_catalogue(args)
    if args.data:
        ensure_loaded(redis_url, _absolute(args.data), args.redis_prefix)
    features = FeatureFetch.bind(redis_url, model_dir, args.history_len, args.redis_prefix, args.catalogue_refresh_s)
    scorer = Scorer.options(
        ray_actor_options={"num_cpus": args.scorer_num_cpus, "num_gpus": args.scorer_num_gpus}
    ).bind(
        _absolute(args.model), _absolute(args.registry_uri), args.registry_poll_s, args.history_len,
        args.scorer_max_batch_size, args.scorer_batch_wait_s, args.scorer_torch_threads,
    )
    ranker = Ranker.bind(model_dir, redis_url, args.redis_prefix, args.catalogue_refresh_s)
    settings = IngressSettings(
        redis_url=redis_url,
        prefix=args.redis_prefix,
        max_candidates=args.max_candidates,
        max_batch_size=args.ingress_max_batch_size,
        batch_wait_s=args.ingress_batch_wait_s,
        max_concurrent_batches=args.ingress_max_concurrent_batches,
        adaptive_wait=args.adaptive_wait,
        variants=[Variant(name, v.weight, v.diversity) for name, v in args.variants.items()],
        registry_uri=_absolute(args.registry_uri) if args.registry_uri and "://" not in args.registry_uri
        else args.registry_uri,
    )
    return Ingress.bind(features, scorer, ranker, settings)

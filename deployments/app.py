"""The application builder: `serve run deployments.app:build_app` or serve_config.yaml.

The app is the whole system: the HTTP ingress (deployments/ingress.py, its routes in
deployments/routes/), the Scorer (deployments/scorer.py; none in layout `fused`), and (layout `split`) the FeatureFetch
and Ranker hops (deployments/feature_fetch.py, deployments/ranker.py), plus the OnlineTrainer
(deployments/online_trainer.py) that keeps training the served model from the event stream and
the EventSink (deployments/sink.py). `build_app` binds them together at its end. Arguments
(`AppArgs`, typed; unknown keys are refused):

- layout: `inline` (default when the Scorer asks for a GPU, scorer_num_gpus > 0: the Ingress
  replica fetches features and ranks with the Ray-free rerank.serving.pipeline code, one Serve hop
  per batch, ingress -> scorer), `fused` (default without scorer GPUs: no Scorer deployment; the
  Ingress replica also holds the models, rerank.serving.models.ModelPool, and scores each batch
  itself, with no Serve hop; refused with scorer_num_gpus > 0) or `split` (FeatureFetch -> Scorer ->
  Ranker, one handle call per batch per hop: for a ranking or feature stage heavy enough to want
  replicas of its own). All three return the same rankings.
- model: a model directory (relative paths resolve against the project root); every replica
  opens it on its own node, so on a multi-node cluster it must be shared storage. Optional
  when registry_uri holds a version.
- registry_uri: the ModelRegistry the scorers follow (hot swap) and the trainer publishes to
  (local path or pyarrow.fs URI such as s3://...); replicas download versions into a per-node
  cache themselves. When it is empty, the builder publishes `model` as v1.
- online: the trainer: {enabled, num_cpus, lease_ttl_s, and any rerank.online.config.OnlineConfig
  field: lr, publish_every_s, guard_margin, holdout_every, ...}. Needs registry_uri.
- experiments: name -> {type: ab|interleave, traffic, salt, arms: {name: {weight, model | registry_uri,
  rules, online}}} (rerank.experiments.book, docs/EXPERIMENTS.md): seeded into the Redis book, changed live
  with PUT/DELETE /admin/experiments/NAME. An arm with `online` gets its own OnlineTrainer
  (deployment `OnlineTrainer-EXP-ARM`) trained on that arm's events only.
- record_impressions / attribution_window_s / impressions_maxlen: every /rank answer is an
  impression on `{prefix}impressions`; events are attributed to them (rerank.experiments.attribution).
- sink: {enabled, out_dir, keep_days, flush_every_s, lease_ttl_s}: the EventSink replica persists
  impressions and events to Parquet by day (rerank.eventlog.sink; one sink per stream, by a Redis lease);
  GET /experiments/NAME/report reads it, on the sink's replica (EventSink.report).
- api_keys: scoped API keys (rerank.serving.auth), plus RERANK_API_KEY (rank+events) and
  RERANK_ADMIN_KEY (all scopes) from the environment of the node that builds the app. Without any
  key the build fails unless `allow_no_auth: true` (auth off, every route open: loopback only; it
  logs a warning and /healthz says `"auth": "off"`). `docs`: with keys, /docs and /openapi.json
  need the admin key unless `docs: true` (then open); without keys they are open.
- model_roots: where experiment arms' `model` / `registry_uri` may point (checked before anything
  reads or creates them; rerank.experiments.book.check_locations); default: the parents of `model`
  and of `registry_uri`.
- redis_url: "redis://...", "env" ($REDIS_URL), or "embedded": a real Redis server owned by a
  detached Ray actor (single node). redis_prefix: every key and the event stream derive from it.
- data: a dataset directory bulk-loaded into the store when the store is empty.
- batching: ingress_max_batch_size / ingress_batch_wait_s (adaptive: 0 when a request arrives
  alone) / scorer_max_batch_size / scorer_batch_wait_s; scorer_num_gpus: GPUs per scorer replica.
  Layout fused: the ingress batch is the forward pass (the scorer_* batching knobs do not apply);
  scorer_torch_threads sets the ingress replica's torch threads.

Serve's performance flags (RAY_SERVE_THROUGHPUT_OPTIMIZED) belong in every node's environment
before `ray start`, not in this app's runtime_env (see README, Deploying).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from deployments.feature_fetch import FeatureFetch
from deployments.ingress import Ingress, IngressSettings
from deployments.online_trainer import OnlineTrainer
from deployments.ranker import Ranker
from deployments.scorer import Scorer
from deployments.sink import EventSink
from rerank.online.config import online_config
from rerank.serving.auth import ApiKeys
from rerank.experiments.attribution import AttributionConfig
from rerank.serving.api import EventTsBounds
from rerank.experiments.book import (
    EXPERIMENT_NAME,
    Experiment,
    ExperimentSpec,
    check_locations,
    check_traffic,
    default_location_roots,
    servable,
)
from rerank.store.keys import DEFAULT_PREFIX

logger = logging.getLogger("ray.serve")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# role -> Serve deployment name (what serve_config.yaml / cluster/ override per deployment)
DEPLOYMENT_NAMES = {"ingress": Ingress.name, "features": FeatureFetch.name, "scorer": Scorer.name,
                    "ranker": Ranker.name, "trainer": OnlineTrainer.name, "sink": EventSink.name}
LAYOUTS = ("inline", "split", "fused")
Layout = Literal["inline", "split", "fused"]


def default_layout(scorer_num_gpus: float) -> str:
    """The layout of an app that names none: `inline` when the Scorer asks for a GPU (the design's
    composition: GPU-backed scorer replicas with dynamic batching), `fused` on CPU-only scorers (the
    Serve hop costs more than the model there; docs/RESULTS.md)."""
    return "inline" if scorer_num_gpus > 0 else "fused"
APP_IMPORT_PATH = "deployments.app:build_app"


class SinkArgs(BaseModel):
    """The EventSink replica: impressions and events from Redis to Parquet (rerank.eventlog.sink)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    out_dir: str = "artifacts/sink"
    keep_days: int | None = Field(None, ge=1, description="delete day partitions older than this")
    flush_every_s: float = Field(5.0, ge=0, description="a file per stream at most this often (0 = every read)")
    num_cpus: float = Field(0.1, gt=0)
    lease_ttl_s: float = Field(10.0, ge=2.0, description="the single-sink lease lapses this long after its "
                               "holder stops renewing it (a pass renews it at least every 0.5 s)")


class OnlineArgs(BaseModel):
    """The online trainer: on/off, its replica's CPUs, lease TTL, and OnlineConfig fields (extra keys)."""

    model_config = ConfigDict(extra="allow")
    enabled: bool = True
    num_cpus: float = Field(0.5, gt=0)
    lease_ttl_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _known_options(self) -> "OnlineArgs":
        online_config(self.options())  # names unknown keys
        return self

    def options(self) -> dict:
        """The OnlineConfig fields given (lr, publish_every_s, guard_margin, ...)."""
        return dict(self.model_extra or {})


class AppArgs(BaseModel):
    """Typed arguments of the app (the `args:` of serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    layout: Layout = Field("fused", description="inline | split | fused; not given (or null): fused when "
                           "scorer_num_gpus is 0, inline when the Scorer asks for a GPU")
    model: str | None = None
    registry_uri: str | None = None
    online: OnlineArgs = Field(default_factory=OnlineArgs)
    registry_poll_s: float = Field(0.2, ge=0)
    redis_url: str = "embedded"
    redis_data_dir: str = str(Path.home() / ".cache" / "rerank" / "redis")
    redis_prefix: str = DEFAULT_PREFIX
    data: str | None = None
    max_candidates: int = Field(1000, ge=1)
    max_catalogue_items: int | None = Field(20_000, ge=1, description="whole-catalogue ranking cap; null = none")
    new_item_allowance: int = Field(
        50_000, ge=0, description="items first seen in events that may join the catalogue beyond the served "
        "model's, per deployment; events naming more are stored with item_idx 0 and counted")
    new_item_rate_per_min: int | None = Field(
        1000, ge=1, description="new items events may add per minute (beyond: stored with item_idx 0 and "
        "counted, like items over new_item_allowance); null = no rate")
    max_in_flight: int = Field(64, ge=1, description="/rank requests inside one ingress replica before 503 + Retry-After (about a second of a CPU replica's capacity)")
    score_timeout_s: float = Field(2.0, gt=0, description="slower scorer calls give a degraded ranking")
    api_keys: dict[str, dict] | None = Field(
        None, description="name -> {key: 'env:VAR' | 'sha256:<hex>' | key, scopes: [rank, events, admin], "
        "user_prefix?, rate_per_s?, burst?}; RERANK_API_KEY / RERANK_ADMIN_KEY / RERANK_API_KEYS in the "
        "builder's environment are added")
    allow_no_auth: bool = Field(
        False, description="start without any API key (every route open): for loopback-only use; without it "
        "a build with no keys fails")
    docs: bool = Field(False, description="with API keys: /docs and /openapi.json open to anyone (default: "
                       "admin key only); without keys they are always open")
    model_roots: list[str] | None = Field(
        None, description="where experiment arms' model / registry_uri may point (dirs or scheme://bucket/prefix); "
        "null = parent of `model` and of `registry_uri`; [] = nowhere")
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
    experiments: dict[str, ExperimentSpec] = Field(
        default_factory=dict, description="name -> experiment (rerank.experiments.book); written to the Redis book "
        "at build, changed live with PUT/DELETE /admin/experiments/NAME")
    record_impressions: bool = True
    attribution_window_s: float = Field(1800.0, gt=0, description="how long an impression can earn clicks")
    impressions_maxlen: int = Field(1_000_000, ge=1000, description="entry cap of the impressions stream")
    impressions_max_bytes: int = Field(256 * 2**20, ge=2**20, description="byte budget of the impressions stream")
    max_impression_items: int = Field(100, ge=1, le=1000, description="items of an answer stored for attribution")
    max_impression_bytes: int = Field(8192, ge=1024, description="bytes of an answer's stored items (their JSON)")
    event_ttl_s: int = Field(6 * 3600, ge=60, description="how long a duplicate event_id is recognised")
    max_bought: int = Field(500, ge=1, description="purchased items kept per user")
    expected_events_per_s: float = Field(200.0, ge=0, description="event rate the memory plan is checked for")
    refuse_unfit_memory: bool = Field(False, description="refuse to start when the memory plan exceeds maxmemory")
    max_event_future_skew_s: float = Field(300.0, ge=0, description="how far ahead of the server clock an event ts may be")
    min_event_ts: float = Field(0.0, ge=0, description="the earliest event ts accepted")
    item_cache_ttl_s: float = Field(1.0, ge=0, description="how old a replica's cached item counters may be (0 = off)")
    sink: SinkArgs = Field(default_factory=SinkArgs)

    @model_validator(mode="before")
    @classmethod
    def _layout_by_gpus(cls, data):
        """No layout given: by the Scorer's GPUs (default_layout)."""
        if isinstance(data, dict) and data.get("layout") is None:
            try:
                gpus = float(data.get("scorer_num_gpus") or 0)
            except (TypeError, ValueError):
                gpus = 0.0  # the field's own validation names the bad value
            data = {**data, "layout": default_layout(gpus)}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "AppArgs":
        if self.layout == "fused" and self.scorer_num_gpus > 0:
            raise ValueError("layout fused scores in the ingress replica, which has no GPU: use layout inline "
                             "for GPU scorers (scorer_num_gpus > 0), or scorer_num_gpus 0")
        if not self.model and not self.registry_uri:
            raise ValueError("give `model` (a model directory) or `registry_uri`")
        if self.online.enabled and not self.registry_uri:
            raise ValueError("online learning publishes to a registry: give `registry_uri`, "
                             "or turn it off with `online: {enabled: false}`")
        if self.scorer_max_batch_size < self.ingress_max_batch_size:
            raise ValueError(
                f"scorer_max_batch_size ({self.scorer_max_batch_size}) must be >= ingress_max_batch_size "
                f"({self.ingress_max_batch_size}): one ingress batch is one scorer call"
            )
        check_traffic([Experiment(name, spec) for name, spec in self.experiments.items()])
        for name, spec in self.experiments.items():
            if not re.match(EXPERIMENT_NAME, name):
                raise ValueError(f"experiment name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
            if self.layout == "split" and servable(name, spec, "split", self.arm_trainers()):
                raise ValueError(f"experiment {name!r}: {servable(name, spec, 'split', self.arm_trainers())}")
        return self

    def arm_trainers(self) -> tuple[str, ...]:
        """"experiment/arm" of every arm with its own online trainer."""
        return tuple(f"{name}/{arm}" for name, spec in self.experiments.items()
                     for arm, a in spec.arms.items() if a.online is not None and spec.status == "running")


def _absolute(path: str | None) -> str | None:
    """Resolve a local path against the project root; URIs pass through."""
    if not path or "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (PROJECT_ROOT / p).resolve())


def embedded_maxmemory_of(args: AppArgs, machine_bytes: int | None = None) -> int:
    """The embedded Redis' maxmemory from the app's bounds (markers at the expected event rate, the
    event stream, the impressions' byte budget) with headroom, at least the default 2 GB; a plan over
    half of the machine's memory is refused (capacity.MemoryPlanError names its parts)."""
    import psutil

    from rerank.infra.redis_server import DEFAULT_MAXMEMORY, parse_memory_size
    from rerank.store import capacity
    from rerank.store.config import FeatureStoreConfig

    plan = capacity.project_memory(FeatureStoreConfig(event_ttl_s=args.event_ttl_s, max_bought=args.max_bought),
                                   expected_events_per_s=args.expected_events_per_s,
                                   impressions_max_bytes=args.impressions_max_bytes)
    machine = machine_bytes if machine_bytes is not None else psutil.virtual_memory().total
    return max(parse_memory_size(DEFAULT_MAXMEMORY), capacity.embedded_maxmemory(plan, maximum=machine // 2))


def resolve_redis_url(args: AppArgs) -> str:
    if args.redis_url == "embedded":
        from deployments.redis_owner import embedded_redis_url

        return embedded_redis_url(_absolute(args.redis_data_dir), embedded_maxmemory_of(args))
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

    from rerank.data.dataset import load_dataset
    from rerank.store.feature_store import FeatureStore

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


def prepare_registry(args: AppArgs) -> None:
    """Check the model source from the builder; publish `model` as v1 into an empty registry."""
    from rerank.models.registry import ModelRegistry

    model = _absolute(args.model)
    if args.registry_uri:
        registry = ModelRegistry(_absolute(args.registry_uri))
        if registry.latest() is not None:
            return
        if not model:
            raise ValueError(f"registry {args.registry_uri} has no published version and no `model` was given")
        registry.publish_dir(model, {"note": f"offline model {model}, published by the app builder"})
    elif not (Path(model) / "config.json").is_file():
        raise ValueError(f"model {model}: not a model directory (config.json missing)")


def prepare_store(redis_url: str, prefix: str, model: str | None, registry_uri: str | None,
                  args: AppArgs | None = None) -> int:
    """Warn about a Redis that may evict or grow without bound, and keep new item ids above the
    served model's items (an emptied Redis would otherwise hand their idx out again).
    Returns the served model's item count."""
    from rerank.store.feature_store import FeatureStore
    from rerank.models.recommender import read_config
    from rerank.models.registry import resolve_model_dir

    model_dir, _ = resolve_model_dir(model, registry_uri)
    n_items = int(read_config(model_dir)["n_items"])
    args = args or AppArgs()
    store = FeatureStore(redis_url, prefix=prefix, event_ttl_s=args.event_ttl_s, max_bought=args.max_bought)
    projection = store.memory_projection(expected_events_per_s=args.expected_events_per_s,
                                         impressions_max_bytes=args.impressions_max_bytes)
    try:
        for problem in store.check_server(projection=projection, refuse=args.refuse_unfit_memory):
            logger.warning("rerank: Redis: %s", problem)
        store.ensure_item_floor(n_items)
    finally:
        store.close()
    return n_items


def absolute_experiments(experiments: dict[str, ExperimentSpec]) -> dict[str, ExperimentSpec]:
    """The experiments with every arm's model / registry path resolved against the project root."""
    out = {}
    for name, spec in experiments.items():
        arms = {arm: a.model_copy(update={"model": _absolute(a.model), "registry_uri": _absolute(a.registry_uri)})
                for arm, a in spec.arms.items()}
        out[name] = spec.model_copy(update={"arms": arms})
    return out


def prepare_experiments(redis_url: str, prefix: str, experiments: dict[str, ExperimentSpec],
                        app_model: str | None, app_registry: str | None) -> None:
    """Write the configured experiments into the Redis book (the config wins for its names; others
    added live stay) and give every arm registry that is empty the app's model as v1."""
    import redis as redis_lib

    from rerank.experiments.book import write_experiment
    from rerank.store.keys import Keys
    from rerank.models.registry import ModelRegistry, resolve_model_dir

    for spec in experiments.values():
        for arm in spec.arms.values():
            if arm.registry_uri and ModelRegistry(arm.registry_uri).latest() is None:
                start_dir, _ = resolve_model_dir(app_model, app_registry)
                ModelRegistry(arm.registry_uri).publish_dir(start_dir, {"note": "the app's model, the arm's start"})
    client = redis_lib.Redis.from_url(redis_url, socket_timeout=5.0)
    try:
        for name, spec in experiments.items():
            write_experiment(client, Keys(prefix).experiments, name, spec)
    finally:
        client.close()


NO_KEYS = (
    "no API keys configured: set RERANK_API_KEY and RERANK_ADMIN_KEY (or RERANK_API_KEYS) in the environment "
    "of the node that builds the app, or `api_keys` in the app args; or set `allow_no_auth: true` in the app "
    "args to serve every route without authentication (loopback-only use: bind the HTTP proxy to 127.0.0.1)"
)


def load_keys(args: AppArgs) -> ApiKeys:
    """The app's API keys (digests only: no key travels to the replicas). No keys: a ValueError
    naming both ways out, unless `allow_no_auth` (then a warning: every route is open)."""
    keys = ApiKeys.load(args.api_keys)
    if not keys.enabled:
        if not args.allow_no_auth:
            raise ValueError(NO_KEYS)
        logger.warning("rerank: authentication is OFF (allow_no_auth: true, no API keys): every route, /admin "
                       "included, is open to whoever reaches the HTTP proxy; bind it to loopback only")
    return keys


def ingress_settings(args: AppArgs, redis_url: str, model: str | None, registry_uri: str | None,
                     n_items: int, keys: ApiKeys | None = None,
                     location_roots: tuple[str, ...] = ()) -> IngressSettings:
    """The Ingress replicas' settings, from the app's args and what the builder prepared."""
    keys = load_keys(args) if keys is None else keys
    return IngressSettings(
        redis_url=redis_url,
        prefix=args.redis_prefix,
        layout=args.layout,
        model=model,
        registry_uri=registry_uri,
        registry_poll_s=args.registry_poll_s,
        torch_threads=args.scorer_torch_threads,
        history_len=args.history_len,
        catalogue_refresh_s=args.catalogue_refresh_s,
        max_candidates=args.max_candidates,
        max_catalogue_items=args.max_catalogue_items,
        item_capacity=n_items + args.new_item_allowance,
        new_item_rate_per_min=args.new_item_rate_per_min,
        max_in_flight=args.max_in_flight,
        score_timeout_s=args.score_timeout_s,
        keys=keys,
        docs=args.docs,
        location_roots=tuple(location_roots),
        max_batch_size=args.ingress_max_batch_size,
        batch_wait_s=args.ingress_batch_wait_s,
        max_concurrent_batches=args.ingress_max_concurrent_batches,
        adaptive_wait=args.adaptive_wait,
        arm_trainers=args.arm_trainers(),
        record_impressions=args.record_impressions,
        attribution=AttributionConfig(window_s=args.attribution_window_s, impressions_maxlen=args.impressions_maxlen,
                                      impressions_max_bytes=args.impressions_max_bytes,
                                      max_impression_items=args.max_impression_items,
                                      max_impression_bytes=args.max_impression_bytes),
        event_ttl_s=args.event_ttl_s,
        max_bought=args.max_bought,
        event_ts_bounds=EventTsBounds(args.max_event_future_skew_s, args.min_event_ts),
        item_cache_ttl_s=args.item_cache_ttl_s,
    )


def build_app(raw_args: dict) -> serve.Application:
    """Build the graph from `raw_args` (validated into AppArgs)."""
    args = AppArgs.model_validate(raw_args or {})
    keys = load_keys(args)  # before anything is created: a build without keys fails first
    if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") != "1":
        logger.info("RAY_SERVE_THROUGHPUT_OPTIMIZED is not set on this node: set it in every node's "
                    "environment before `ray start` for the measured throughput")
    redis_url = resolve_redis_url(args)
    model, registry_uri = _absolute(args.model), _absolute(args.registry_uri)
    # arm locations before anything reads them (prepare_experiments creates and publishes arm registries)
    roots = ([_absolute(r) for r in args.model_roots] if args.model_roots is not None
             else default_location_roots(model, registry_uri))
    experiments = absolute_experiments(args.experiments)
    for name, spec in experiments.items():
        if (problem := check_locations(spec, roots)):
            raise ValueError(f"experiment {name!r}: {problem}")
    prepare_registry(args)
    if args.data:
        ensure_loaded(redis_url, _absolute(args.data), args.redis_prefix)
    n_items = prepare_store(redis_url, args.redis_prefix, model, registry_uri, args)
    prepare_experiments(redis_url, args.redis_prefix, experiments, model, registry_uri)
    scorer = None  # fused: the Ingress replicas hold the models themselves
    if args.layout != "fused":
        scorer = Scorer.options(
            ray_actor_options={"num_cpus": args.scorer_num_cpus, "num_gpus": args.scorer_num_gpus}
        ).bind(
            model, registry_uri, args.registry_poll_s, args.history_len,
            args.scorer_max_batch_size, args.scorer_batch_wait_s, args.scorer_torch_threads,
        )
    features = ranker = trainer = None
    if args.layout == "split":
        features = FeatureFetch.bind(redis_url, model, registry_uri, args.history_len, args.redis_prefix,
                                     args.catalogue_refresh_s, args.item_cache_ttl_s)
        ranker = Ranker.bind(model, registry_uri, redis_url, args.redis_prefix, args.catalogue_refresh_s)
    if args.online.enabled:
        trainer = OnlineTrainer.options(ray_actor_options={"num_cpus": args.online.num_cpus}).bind(
            redis_url, registry_uri, args.redis_prefix, {"max_items": n_items + args.new_item_allowance,
                                                         **args.online.options()}, lease_ttl_s=args.online.lease_ttl_s)
    arm_trainers = {}
    for arm in args.arm_trainers():  # an experiment arm's own trainer, on its arm's events
        exp_name, _, arm_name = arm.partition("/")
        spec = experiments[exp_name].arms[arm_name]
        arm_trainers[arm] = OnlineTrainer.options(
            name=f"{OnlineTrainer.name}-{exp_name}-{arm_name}", ray_actor_options={"num_cpus": args.online.num_cpus},
        ).bind(redis_url, spec.registry_uri, args.redis_prefix, {"max_items": n_items + args.new_item_allowance,
                                                                 **spec.online}, lease_ttl_s=args.online.lease_ttl_s,
               arm=arm)
    sink = None
    if args.sink.enabled:
        sink = EventSink.options(ray_actor_options={"num_cpus": args.sink.num_cpus}).bind(
            redis_url, _absolute(args.sink.out_dir), prefix=args.redis_prefix, keep_days=args.sink.keep_days,
            flush_every_s=args.sink.flush_every_s, lease_ttl_s=args.sink.lease_ttl_s)
    settings = ingress_settings(args, redis_url, model, registry_uri, n_items, keys, tuple(roots))
    return Ingress.bind(scorer, settings, features=features, ranker=ranker, trainer=trainer,
                        arm_trainers=arm_trainers, sink=sink)

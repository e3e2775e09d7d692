"""Scorer: the model in a Serve replica; batched forward passes and hot-swapped weights.

`score(list)` is called once per ingress batch; @serve.batch (sized by the number
of requests, not calls) merges concurrent calls (from several ingress batches or
replicas) into one forward pass, run off the event loop. Weights come from a
model directory, or from the newest version in a ModelRegistry, which a daemon
thread polls every `poll_s`; a newer version is loaded in that thread and
swapped in by one reference assignment, so in-flight batches finish on the old
weights and no request fails. A replica whose registry LATEST does not load
(missing or corrupt weights) starts on the newest older version that does and
keeps polling for LATEST. CUDA is used when the replica has a GPU.

Experiment arms may serve other models: `score(inputs, model_key)` with a key of
rerank.experiments.book.ArmSpec.model_key ("dir:PATH" or "registry:URI"; "" = the app's
model). An arm's model is loaded on its first request (at most MAX_ARM_MODELS kept,
least recently used dropped), registry arms are polled like the main registry, and
one forward pass per model serves each merged batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray import serve

from rerank.models.recommender import Recommender, load_model, read_config
from rerank.serving.scoring import ScoreInput, score_batch
from rerank.serving.pipeline import FetchedBatch, ScoredBatch

logger = logging.getLogger("ray.serve")
MAX_ARM_MODELS = 8
ARM_RETRY_S = 30.0  # an arm model that failed to load is tried again after this long


@dataclass
class LoadedModel:
    model: Recommender
    version: str
    source: str
    loaded_at: float
    meta: dict = field(default_factory=dict)


def _request_count(calls: list) -> int:
    """batch_size_fn: a call carries (model_key, list of requests); count the requests."""
    return sum(len(inputs) for _, inputs in calls)


@serve.deployment(
    name="Scorer",
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=32,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
    logging_config={"enable_access_log": False},  # internal hop: the ingress logs requests
)
class Scorer:
    def __init__(self, model_dir: str | None, registry_uri: str | None = None, poll_s: float = 0.2,
                 history_len: int = 50, max_batch_size: int = 64, batch_wait_s: float = 0.002,
                 torch_threads: int = 1) -> None:
        import torch

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.history_len = history_len
        self.registry = None
        if registry_uri:
            from rerank.models.registry import ModelRegistry

            self.registry = ModelRegistry(registry_uri)
        self.current = self._initial(model_dir)
        self.arm_models: dict[str, LoadedModel] = {}  # model_key -> model of an experiment arm
        self._arm_registries: dict[str, object] = {}
        self._arm_locks: dict[str, asyncio.Lock] = {}
        # arm loads may wait on a remote store: their own threads, never those of the forward passes
        self._arm_loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="arm-model-load")
        self._arm_failures: dict[str, tuple[float, Exception]] = {}  # model_key -> (when, why) it did not load
        self._score_batched.set_max_batch_size(max_batch_size)
        self._batch_wait_s = batch_wait_s
        self._in_flight = 0  # score calls inside this replica: alone = no point waiting for company
        self._stop = threading.Event()
        if poll_s > 0:
            threading.Thread(target=self._poll, args=(poll_s,), name="registry-poll", daemon=True).start()

    # ------------------------------------------------------------------ loading
    def _prepare(self, model: Recommender) -> Recommender:
        if hasattr(model, "to"):
            model.to(self.device)
        return model

    def _initial(self, model_dir: str | None) -> LoadedModel:
        if self.registry is not None:
            version = self.registry.latest()
            if version is not None:
                return self._load_loadable(version)
        if not model_dir:
            raise ValueError("Scorer needs `model` (a model directory) or a registry with a published version")
        config = read_config(model_dir)
        model = self._prepare(load_model(model_dir))
        meta = {k: config[k] for k in ("trained_until",) if k in config}
        return LoadedModel(model, f"dir:{Path(model_dir).name}", str(model_dir), time.time(), meta)

    def _load_loadable(self, latest: int) -> LoadedModel:
        """LATEST, else the newest older version that loads (a warning names each broken one);
        RegistryError when none does. The poll thread keeps trying LATEST."""
        from rerank.models.registry import RegistryError

        unloadable = (OSError, ValueError, RegistryError)  # ModelLoadError is a ValueError
        try:
            return self._load_version(latest)
        except unloadable as err:
            first = err
            logger.warning("scorer: registry LATEST v%s does not load (%s); trying older versions", latest, err)
        for version in sorted((v for v in self.registry.versions() if v < latest), reverse=True):
            try:
                loaded = self._load_version(version)
            except unloadable as err:
                logger.warning("scorer: registry v%s does not load either (%s)", version, err)
                continue
            logger.warning("scorer: serving v%s until LATEST v%s loads", version, latest)
            return loaded
        raise RegistryError(f"{self.registry.uri}: no version loads (LATEST v{latest}: {first})") from first

    def _load_version(self, version: int) -> LoadedModel:
        model = self._prepare(self.registry.load(version))
        meta = self.registry.meta(version)
        return LoadedModel(model, f"v{version}", f"{self.registry.uri}#v{version}", time.time(), meta)

    def _load_arm(self, key: str) -> LoadedModel:
        """Load an arm's model: "dir:PATH" (a model directory) or "registry:URI" (its LATEST)."""
        from rerank.models.registry import ModelRegistry

        kind, _, where = key.partition(":")
        if kind == "dir":
            model = self._prepare(load_model(where))
            meta = {k: v for k, v in read_config(where).items() if k == "trained_until"}
            return LoadedModel(model, f"dir:{Path(where).name}", where, time.time(), meta)
        if kind != "registry":
            raise ValueError(f"model key {key!r}: expected dir:PATH or registry:URI")
        registry = self._arm_registries.setdefault(key, ModelRegistry(where))
        version = registry.latest()
        if version is None:
            raise ValueError(f"arm registry {where} has no published version")
        model = self._prepare(registry.load(version))
        return LoadedModel(model, f"v{version}", f"{registry.uri}#v{version}", time.time(), registry.meta(version))

    def _poll(self, poll_s: float) -> None:
        """Swap in the registry's LATEST whenever it differs from what is served (also a rollback);
        the same for every arm model that follows a registry."""
        while not self._stop.wait(poll_s):
            try:
                latest = self.registry.latest() if self.registry is not None else None
                if latest is not None and f"v{latest}" != self.current.version:
                    loaded = self._load_version(latest)
                    self.current = loaded  # atomic reference swap; running batches keep theirs
                    logger.info("scorer: now serving %s (%s)", loaded.version, type(loaded.model).__name__)
            except Exception:
                logger.exception("scorer: registry poll failed; keeping %s", self.current.version)
            for key, registry in list(self._arm_registries.items()):
                try:
                    latest = registry.latest()
                    served = self.arm_models.get(key)
                    if served is not None and latest is not None and f"v{latest}" != served.version:
                        self.arm_models[key] = self._load_arm(key)
                except Exception:
                    logger.exception("scorer: arm registry poll failed; keeping %s", key)

    async def _model(self, key: str) -> LoadedModel:
        """The model of `key` ("" = the app's), loaded on first use off the event loop."""
        if not key:
            return self.current
        loaded = self.arm_models.get(key)
        if loaded is None:
            failed = self._arm_failures.get(key)
            if failed is not None and time.monotonic() - failed[0] < ARM_RETRY_S:
                raise failed[1]  # a model that just failed to load: fail fast (degraded), retry later
            async with self._arm_locks.setdefault(key, asyncio.Lock()):  # one load per model at a time
                loaded = self.arm_models.get(key)
                if loaded is None:
                    try:
                        loaded = await asyncio.get_running_loop().run_in_executor(self._arm_loader, self._load_arm, key)
                    except Exception as err:
                        self._arm_failures[key] = (time.monotonic(), err)
                        raise
                    self._arm_failures.pop(key, None)
                    while len(self.arm_models) >= MAX_ARM_MODELS:
                        dropped = next(iter(self.arm_models))
                        self.arm_models.pop(dropped)
                        self._arm_registries.pop(dropped, None)
                        self._arm_locks.pop(dropped, None)
                    self.arm_models[key] = loaded
        else:  # most recently used last
            self.arm_models[key] = self.arm_models.pop(key)
        return loaded

    # ------------------------------------------------------------------ serving
    async def score(self, inputs: list[ScoreInput], model_key: str = "") -> ScoredBatch:
        """Scores for one ingress batch by the model of `model_key` (possibly merged with other
        calls into one forward pass per model; the batch wait applies only while other calls are
        in flight, adaptive like the ingress)."""
        await self._model(model_key)  # load an arm's model before queueing
        self._in_flight += 1
        self._score_batched.set_batch_wait_timeout_s(self._batch_wait_s if self._in_flight > 1 else 0.0)
        try:
            return await self._score_batched((model_key, inputs))
        finally:
            self._in_flight -= 1

    async def score_features(self, fetched: FetchedBatch) -> ScoredBatch:
        """score() for FeatureFetch's output, so the `split` ingress can chain the two calls."""
        return await self.score(fetched.score_inputs())  # split layout: the app's model only

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, max_concurrent_batches=1,
                 batch_size_fn=_request_count)
    async def _score_batched(self, calls: list[tuple[str, list[ScoreInput]]]) -> list[ScoredBatch]:
        out: list[ScoredBatch | None] = [None] * len(calls)
        for key in dict.fromkeys(k for k, _ in calls):  # one forward pass per model
            mine = [i for i, (k, _) in enumerate(calls) if k == key]
            loaded = await self._model(key)  # one model for the whole forward pass
            flat = [x for i in mine for x in calls[i][1]]
            began = time.perf_counter()
            scores = await asyncio.to_thread(score_batch, loaded.model, flat, self.history_len)
            elapsed = (time.perf_counter() - began) * 1000.0
            start = 0
            for i in mine:
                n = len(calls[i][1])
                out[i] = ScoredBatch(scores[start : start + n], loaded.version, len(flat), elapsed)
                start += n
        return out

    def current_version(self) -> dict:
        """What GET /model reports: version, kind, source, loaded_at, trained_until, meta."""
        loaded = self.current
        return {
            "version": loaded.version,
            "kind": getattr(loaded.model, "kind", type(loaded.model).__name__),
            "source": loaded.source,
            "loaded_at": loaded.loaded_at,
            "trained_until": loaded.meta.get("trained_until"),
            "meta": loaded.meta,
        }

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()

"""The models a serving replica scores with, without Ray: loading, hot swap, experiment arms.

`ModelPool` is what the Scorer deployment (deployments/scorer.py, layouts inline and split) and
the fused Ingress (layout fused: no Scorer, the ingress replica scores itself) hold:

- the app's model, from a model directory or from the newest version in a ModelRegistry. A
  registry whose LATEST does not load (missing or corrupt weights) starts the pool on the newest
  older version that does (a warning names each broken one); the poll thread keeps trying LATEST;
- the registry poll thread (every `poll_s`): a version other than the one served (newer, or a
  rollback) is loaded in that thread and swapped in by one reference assignment (`current`), so
  forward passes already running finish on the old weights and no request fails;
- experiment arms' models by model key (rerank.experiments.book.ArmSpec.model_key: "dir:PATH" or
  "registry:URI"; "" = the app's model): loaded on first use, one load per key at a time, at most
  MAX_ARM_MODELS kept (least recently used dropped); a key that failed to load fails fast for
  ARM_RETRY_S and is then tried again; registry arms are polled like the app's registry;
- `score(model_key, inputs)`: one forward pass (rerank.serving.scoring.score_batch) by the right
  model; `score_calls` cuts one pass per model out of several callers' inputs.

Everything here blocks (loads, forward passes): callers on an event loop run it in threads. Loads of
arm models belong on `loader` (their own threads, never those of the forward passes), for which
`peek` says whether a load is needed at all.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rerank.models.recommender import Recommender, load_model, read_config
from rerank.serving.pipeline import ScoredBatch
from rerank.serving.scoring import ScoreInput, score_batch

MAX_ARM_MODELS = 8
ARM_RETRY_S = 30.0  # an arm model that failed to load is tried again after this long


@dataclass
class LoadedModel:
    model: Recommender
    version: str
    source: str
    loaded_at: float
    meta: dict = field(default_factory=dict)


class ModelPool:
    """The app's model (hot-swapped from a registry) and the experiment arms' models of one replica.

    `model_dir` and/or `registry_uri` as in the app's args (the registry wins when it holds a
    version); `poll_s` 0 = no poll thread; `torch_threads` > 0 sets torch's intra-op threads of
    the process; `device` None = CUDA when present. Messages go to `logger` prefixed by `label`.
    """

    def __init__(self, model_dir: str | None, registry_uri: str | None = None, poll_s: float = 0.2,
                 history_len: int = 50, torch_threads: int = 0, device: str | None = None,
                 logger: logging.Logger | None = None, label: str = "scorer") -> None:
        import torch

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.history_len = history_len
        self.log = logger or logging.getLogger(__name__)
        self.label = label
        self.registry = None
        if registry_uri:
            from rerank.models.registry import ModelRegistry

            self.registry = ModelRegistry(registry_uri)
        self.current: LoadedModel = self._initial(model_dir)
        self.arm_models: dict[str, LoadedModel] = {}  # model_key -> model of an experiment arm, LRU order
        self._arm_registries: dict[str, object] = {}
        self._arm_locks: dict[str, threading.Lock] = {}  # one load per key at a time
        self._arm_failures: dict[str, tuple[float, Exception]] = {}  # model_key -> (when, why) it did not load
        self._lock = threading.Lock()  # guards the three dicts above and arm_models
        # arm loads may wait on a remote store: their own threads, never those of the forward passes
        self.loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="arm-model-load")
        self.stopped = threading.Event()
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
            raise ValueError(f"{self.label} needs `model` (a model directory) or a registry with a published version")
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
            self.log.warning("%s: registry LATEST v%s does not load (%s); trying older versions", self.label, latest, err)
        for version in sorted((v for v in self.registry.versions() if v < latest), reverse=True):
            try:
                loaded = self._load_version(version)
            except unloadable as err:
                self.log.warning("%s: registry v%s does not load either (%s)", self.label, version, err)
                continue
            self.log.warning("%s: serving v%s until LATEST v%s loads", self.label, version, latest)
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
        with self._lock:
            registry = self._arm_registries.get(key)
            if registry is None:
                registry = self._arm_registries[key] = ModelRegistry(where)
        version = registry.latest()
        if version is None:
            raise ValueError(f"arm registry {where} has no published version")
        model = self._prepare(registry.load(version))
        return LoadedModel(model, f"v{version}", f"{registry.uri}#v{version}", time.time(), registry.meta(version))

    def _poll(self, poll_s: float) -> None:
        """Swap in the registry's LATEST whenever it differs from what is served (also a rollback);
        the same for every arm model that follows a registry."""
        while not self.stopped.wait(poll_s):
            try:
                latest = self.registry.latest() if self.registry is not None else None
                if latest is not None and f"v{latest}" != self.current.version:
                    loaded = self._load_version(latest)
                    self.current = loaded  # atomic reference swap; running forward passes keep theirs
                    self.log.info("%s: now serving %s (%s)", self.label, loaded.version, type(loaded.model).__name__)
            except Exception:
                self.log.exception("%s: registry poll failed; keeping %s", self.label, self.current.version)
            with self._lock:
                arm_registries = list(self._arm_registries.items())
            for key, registry in arm_registries:
                try:
                    latest = registry.latest()
                    served = self.arm_models.get(key)
                    if served is not None and latest is not None and f"v{latest}" != served.version:
                        loaded = self._load_arm(key)
                        with self._lock:
                            if key in self.arm_models:  # not dropped meanwhile
                                self.arm_models[key] = loaded
                except Exception:
                    self.log.exception("%s: arm registry poll failed; keeping %s", self.label, key)

    def peek(self, key: str) -> LoadedModel | None:
        """The model of `key` ("" = the app's) if it is loaded (now the most recently used), None
        when it has to be loaded first (`model`); the load's error while a failed load is recent."""
        if not key:
            return self.current
        with self._lock:
            loaded = self.arm_models.pop(key, None)
            if loaded is not None:
                self.arm_models[key] = loaded  # most recently used last
                return loaded
            failed = self._arm_failures.get(key)
        if failed is not None and time.monotonic() - failed[0] < ARM_RETRY_S:
            raise failed[1].with_traceback(None)  # fail fast (a degraded answer), retry later
        return None

    def model(self, key: str) -> LoadedModel:
        """The model of `key`, loaded here on first use (blocking; one load per key at a time: a
        caller that waited for another's load gets its model, or its error)."""
        loaded = self.peek(key)
        if loaded is not None:
            return loaded
        with self._lock:
            key_lock = self._arm_locks.setdefault(key, threading.Lock())
        with key_lock:
            loaded = self.peek(key)  # loaded (or failed) while this caller waited
            if loaded is not None:
                return loaded
            try:
                loaded = self._load_arm(key)
            except Exception as err:
                with self._lock:
                    self._arm_failures[key] = (time.monotonic(), err)
                raise
            with self._lock:
                self._arm_failures.pop(key, None)
                while len(self.arm_models) >= MAX_ARM_MODELS:
                    dropped = next(iter(self.arm_models))
                    self.arm_models.pop(dropped)
                    self._arm_registries.pop(dropped, None)
                    self._arm_locks.pop(dropped, None)
                self.arm_models[key] = loaded
            return loaded

    # ------------------------------------------------------------------ scoring
    def score(self, model_key: str, inputs: Sequence[ScoreInput]) -> ScoredBatch:
        """One forward pass over `inputs` by the model of `model_key` (loaded first if need be)."""
        loaded = self.model(model_key)  # one model for the whole forward pass
        began = time.perf_counter()
        scores = score_batch(loaded.model, inputs, self.history_len)
        return ScoredBatch(scores, loaded.version, len(inputs), (time.perf_counter() - began) * 1000.0)

    def score_calls(self, calls: Sequence[tuple[str, Sequence[ScoreInput]]]) -> list[ScoredBatch]:
        """Several callers' (model_key, inputs) with one forward pass per model: each caller gets its
        own rows, with the pass's batch size (all rows of that model) and time."""
        out: list[ScoredBatch | None] = [None] * len(calls)
        for key in dict.fromkeys(k for k, _ in calls):
            mine = [i for i, (k, _) in enumerate(calls) if k == key]
            scored = self.score(key, [x for i in mine for x in calls[i][1]])
            start = 0
            for i in mine:
                n = len(calls[i][1])
                out[i] = ScoredBatch(scored.scores[start : start + n], scored.model_version, scored.batch_size,
                                     scored.elapsed_ms)
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

    def close(self) -> None:
        """Stop the poll thread and the loader threads (a load under way finishes)."""
        self.stopped.set()
        self.loader.shutdown(wait=False)

"""Scorer: the model in a Serve replica; batched forward passes and hot-swapped weights.

`score(list)` is called once per ingress batch; @serve.batch (sized by the number
of requests, not calls) merges concurrent calls (from several ingress batches or
replicas) into one forward pass, run off the event loop. Weights come from a
model directory, or from the newest version in a ModelRegistry, which a daemon
thread polls every `poll_s`; a newer version is loaded in that thread and
swapped in by one reference assignment, so in-flight batches finish on the old
weights and no request fails. CUDA is used when the replica has a GPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray import serve

from rerank.recommender import Recommender, load_model, read_config
from rerank.scoring import ScoreInput, score_batch
from rerank.serving import FetchedBatch, ScoredBatch

logger = logging.getLogger("ray.serve")


@dataclass
class LoadedModel:
    model: Recommender
    version: str
    source: str
    loaded_at: float
    meta: dict = field(default_factory=dict)


def _request_count(calls: list) -> int:
    """batch_size_fn: a call carries a list of requests; count the requests."""
    return sum(len(call) for call in calls)


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
            from rerank.registry import ModelRegistry

            self.registry = ModelRegistry(registry_uri)
        self.current = self._initial(model_dir)
        self._score_batched.set_max_batch_size(max_batch_size)
        self._batch_wait_s = batch_wait_s
        self._in_flight = 0  # score calls inside this replica: alone = no point waiting for company
        self._stop = threading.Event()
        if self.registry is not None and poll_s > 0:
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
                return self._load_version(version)
        if not model_dir:
            raise ValueError("Scorer needs `model` (a model directory) or a registry with a published version")
        config = read_config(model_dir)
        model = self._prepare(load_model(model_dir))
        meta = {k: config[k] for k in ("trained_until",) if k in config}
        return LoadedModel(model, f"dir:{Path(model_dir).name}", str(model_dir), time.time(), meta)

    def _load_version(self, version: int) -> LoadedModel:
        model = self._prepare(self.registry.load(version))
        meta = self.registry.meta(version)
        return LoadedModel(model, f"v{version}", f"{self.registry.uri}#v{version}", time.time(), meta)

    def _poll(self, poll_s: float) -> None:
        """Swap in the registry's LATEST whenever it differs from what is served (also a rollback)."""
        while not self._stop.wait(poll_s):
            try:
                latest = self.registry.latest()
                if latest is not None and f"v{latest}" != self.current.version:
                    loaded = self._load_version(latest)
                    self.current = loaded  # atomic reference swap; running batches keep theirs
                    logger.info("scorer: now serving %s (%s)", loaded.version, type(loaded.model).__name__)
            except Exception:
                logger.exception("scorer: registry poll failed; keeping %s", self.current.version)

    # ------------------------------------------------------------------ serving
    async def score(self, inputs: list[ScoreInput]) -> ScoredBatch:
        """Scores for one ingress batch (possibly merged with other calls into one forward pass;
        the batch wait applies only while other calls are in flight, adaptive like the ingress)."""
        self._in_flight += 1
        self._score_batched.set_batch_wait_timeout_s(self._batch_wait_s if self._in_flight > 1 else 0.0)
        try:
            return await self._score_batched(inputs)
        finally:
            self._in_flight -= 1

    async def score_features(self, fetched: FetchedBatch) -> ScoredBatch:
        """score() for FeatureFetch's output, so the `split` ingress can chain the two calls."""
        return await self.score(fetched.score_inputs())

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, max_concurrent_batches=1,
                 batch_size_fn=_request_count)
    async def _score_batched(self, calls: list[list[ScoreInput]]) -> list[ScoredBatch]:
        loaded = self.current  # one model for the whole forward pass
        flat = [x for call in calls for x in call]
        began = time.perf_counter()
        scores = await asyncio.to_thread(score_batch, loaded.model, flat, self.history_len)
        elapsed = (time.perf_counter() - began) * 1000.0
        out, start = [], 0
        for call in calls:
            out.append(ScoredBatch(scores[start : start + len(call)], loaded.version, len(flat), elapsed))
            start += len(call)
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

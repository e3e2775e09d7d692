"""Scorer: the model in a Serve replica (layouts inline and split); a thin batching wrapper.

The models themselves (loading from a model directory or a registry, the registry poll thread
with its atomic hot swap, experiment arms' models by model key) are the Ray-free
rerank.serving.models.ModelPool, which the fused layout's Ingress holds itself. This deployment
adds what is Serve's: `score(list)` is called once per ingress batch; @serve.batch (sized by the
number of requests, not calls) merges concurrent calls (from several ingress batches or replicas)
into one forward pass per model, run off the event loop; the batch wait applies only while other
calls are in flight. CUDA is used when the replica has a GPU.

Experiment arms may serve other models: `score(inputs, model_key)` with a key of
rerank.experiments.book.ArmSpec.model_key ("dir:PATH" or "registry:URI"; "" = the app's
model). An arm's model is loaded on its first request, on the pool's loader threads
(`model_off_loop`), before the call joins a batch.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from rerank.serving.models import LoadedModel, ModelPool
from rerank.serving.pipeline import FetchedBatch, ScoredBatch
from rerank.serving.scoring import ScoreInput

logger = logging.getLogger("ray.serve")


def _request_count(calls: list) -> int:
    """batch_size_fn: a call carries (model_key, list of requests); count the requests."""
    return sum(len(inputs) for _, inputs in calls)


async def model_off_loop(models: ModelPool, key: str) -> LoadedModel:
    """The model of `key`; one not loaded yet is loaded on the pool's loader threads, never on the
    event loop (a recent failed load raises at once)."""
    loaded = models.peek(key)
    if loaded is not None:
        return loaded
    return await asyncio.get_running_loop().run_in_executor(models.loader, models.model, key)


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
        self.models = ModelPool(model_dir, registry_uri, poll_s, history_len, torch_threads=torch_threads,
                                logger=logger, label="scorer")
        self.device = self.models.device
        self._stop = self.models.stopped  # set: the registry poll thread ends
        self._score_batched.set_max_batch_size(max_batch_size)
        self._batch_wait_s = batch_wait_s
        self._in_flight = 0  # score calls inside this replica: alone = no point waiting for company

    @property
    def current(self) -> LoadedModel:
        """The app's model as served now (swapped by the pool's poll thread)."""
        return self.models.current

    async def score(self, inputs: list[ScoreInput], model_key: str = "") -> ScoredBatch:
        """Scores for one ingress batch by the model of `model_key` (possibly merged with other
        calls into one forward pass per model; the batch wait applies only while other calls are
        in flight, adaptive like the ingress)."""
        await model_off_loop(self.models, model_key)  # load an arm's model before queueing
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
        return await asyncio.to_thread(self.models.score_calls, calls)  # one forward pass per model

    def current_version(self) -> dict:
        """What GET /model reports: version, kind, source, loaded_at, trained_until, meta."""
        return self.models.current_version()

    def __del__(self) -> None:
        if hasattr(self, "models"):
            self.models.close()

"""OnlineTrainer: the app's continuous-learning replica (rerank.online.loop.OnlineLoop in a thread).

Part of the app (deployments/app.py binds it when `online.enabled`), so `serve run`,
`serve deploy` and the RayService all start it, Serve restarts its replica when it dies, and
`serve delete` stops it. One replica; a Redis lease (rerank.store.lease, key `{prefix}trainer:lease`)
makes sure that only one trainer works a stream even while a redeploy briefly runs an old and a
new replica: the other waits as a standby. The loop and exactly-once live in rerank/online/loop.py
(the steps in trainer.py, the guard in guard.py, the options in config.py); this wrapper adds the
thread, backoff, the lease and Ray metrics (events applied, versions published, guard refusals, lag,
event -> published-weights delay, loop errors).

A Redis outage never kills the replica: starting (checkpoint load, recovery of pending entries)
and every poll retry with exponential backoff, and the state shows in `stats()` / `/healthz`.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
from ray import serve

from rerank.online.config import online_config
from rerank.online.loop import LoopStats, OnlineLoop
from rerank.store.keys import DEFAULT_PREFIX

logger = logging.getLogger("ray.serve")
DELAY_BOUNDARIES_S = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0]
CONSUMER = "trainer"  # one name for every holder of the lease: a successor recovers its pending entries
GROUP = "online-trainer"
MAX_BACKOFF_S = 5.0


@serve.deployment(name="OnlineTrainer", num_replicas=1, ray_actor_options={"num_cpus": 0.5},
                  max_ongoing_requests=8, health_check_period_s=5, graceful_shutdown_timeout_s=30,
                  logging_config={"enable_access_log": False})
class OnlineTrainer:
    def __init__(self, redis_url: str, registry_uri: str, prefix: str = DEFAULT_PREFIX, options: dict | None = None,
                 claim_idle_ms: int = 5_000, lease_ttl_s: float = 10.0, torch_threads: int = 1,
                 arm: str | None = None) -> None:
        import redis
        import torch
        from ray.util.metrics import Counter, Gauge, Histogram

        from rerank.store.keys import Keys
        from rerank.store.lease import RedisLease
        from rerank.models.registry import ModelRegistry
        from rerank.store.stream import EventStream, StreamConfig

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        keys = Keys(prefix)
        self.config = online_config({**(options or {}), **({"only_arm": arm} if arm else {})})
        group, lease_key = GROUP, keys.trainer_lease
        if arm:  # an experiment arm's own trainer: its own consumer group and lease, its arm's events only
            experiment, _, arm_name = arm.partition("/")
            group, lease_key = f"{GROUP}:{arm}", keys.arm_trainer_lease(experiment, arm_name)
        self.delays: list[float] = []  # recent per-event stream -> publish delays (s)
        self._delay_hist = Histogram("rerank_online_event_to_publish_s", boundaries=DELAY_BOUNDARIES_S,
                                     description="seconds from an event's XADD to a published version containing it")
        self._counters = {name: Counter(f"rerank_online_{name}", description=f"online trainer: {name}")
                          for name in ("events_applied", "versions_published", "guard_refusals",
                                       "events_trimmed_unapplied")}
        self._errors = Counter("rerank_online_loop_errors", description="online trainer loop errors (retried)")
        self._lag = Gauge("rerank_online_lag_events", description="stream entries after the last checkpoint")
        self._version = Gauge("rerank_online_version", description="newest version the trainer stands on")
        self._make_loop = lambda: OnlineLoop(
            EventStream(StreamConfig(url=redis_url, stream=keys.events, group=group, consumer=CONSUMER,
                                     claim_idle_ms=claim_idle_ms)),
            ModelRegistry(registry_uri), self.config, on_publish=self._on_publish)
        client = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.lease = RedisLease(client, lease_key, lease_ttl_s)
        self.loop: OnlineLoop | None = None  # built once the lease is held
        self._loop_term = 0  # the lease term the loop was built in (rerank.store.lease.RedisLease.term)
        self.loop_restarts = 0  # loops rebuilt because the lease lapsed and was taken again
        self.state = "starting"  # starting | standby | training | paused | backoff | stopped
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: str | None = None
        self._error_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="online-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the loop thread
    def _on_publish(self, version: int, delays: list[float]) -> None:
        for d in delays:
            self._delay_hist.observe(max(0.0, d))
        self.delays.extend(delays)
        del self.delays[:-20_000]

    def _export(self) -> None:
        st = self.loop.stats
        for name, counter in self._counters.items():
            now = getattr(st, name)
            if now > self._seen.get(name, now):
                counter.inc(now - self._seen[name])
            self._seen[name] = now
        if st.version is not None:
            self._version.set(st.version)

    def _step(self) -> None:
        """One iteration: hold the lease, start the loop once, poll once."""
        if not self.lease.acquire():
            if self.loop is not None:  # lost the lease (e.g. paused past its TTL): never publish again
                logger.warning("online trainer: lease lost; standing by (the new holder recovers our entries)")
                self.loop = None
            self.state = "standby"
            self._stop.wait(1.0)
            return
        with self._lock:
            if self.loop is not None and self.lease.term != self._loop_term:
                # the hold lapsed and was taken afresh: another trainer may have checkpointed and
                # taken our pending entries meanwhile, so this loop's memory is stale
                logger.warning("online trainer: lease lapsed and was taken again; restarting from the checkpoint")
                self.loop = None
                self.loop_restarts += 1
            if self.loop is None:
                loop = self._make_loop()
                loop.start()  # checkpoint + recovery of pending entries
                self.loop, self._loop_term = loop, self.lease.term
                self._seen = {name: getattr(loop.stats, name) for name in self._counters}
            self.loop.poll_once()
            self._export()
            self.state = "paused" if self.loop.stats.paused else "training"

    def _run(self) -> None:
        backoff, last_lag = 0.5, 0.0
        while not self._stop.is_set():
            try:
                self._step()
                backoff = 0.5
                if self.loop is not None and time.monotonic() - last_lag > 1.0:
                    self._lag.set(self.loop.lag())
                    last_lag = time.monotonic()
            except Exception as err:  # Redis or the registry unreachable: retry, never die
                self._error, self._error_at = f"{type(err).__name__}: {err}", time.time()
                self._errors.inc()
                self.state = "backoff"
                logger.warning("online trainer: %s; retrying in %.1f s", self._error, backoff)
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
        self.state = "stopped"

    # ------------------------------------------------------------------ handle methods
    def stats(self) -> dict:
        """State, counters, the version it stands on, lag, delay percentiles, last error. Without
        the loop's lock: a step or a publish in progress must not make /healthz wait (the counters
        are a snapshot that may be mid-update)."""
        loop = self.loop
        out = loop.stats.to_dict() if loop is not None else LoopStats().to_dict()  # zeros until it starts
        if loop is not None:
            try:
                out["lag_events"] = loop.lag()
            except Exception:  # Redis down: the lag is unknown, the rest still answers
                out["lag_events"] = None
        d = np.asarray(self.delays[-5000:])
        out["event_to_publish_s"] = ({"p50": float(np.percentile(d, 50)), "p99": float(np.percentile(d, 99)),
                                      "n": int(len(d))} if len(d) else None)
        out.update(state=self.state, lease_held=self.lease.held, lease_term=self.lease.term,
                   loop_restarts=self.loop_restarts, error=self._error, error_at=self._error_at)
        return out

    def flush(self) -> dict:
        """Checkpoint what was consumed now (publish through the guard); returns stats."""
        with self._lock:
            if self.loop is not None:
                self.loop.checkpoint()
        return self.stats()

    def stop(self) -> dict:
        """Stop the loop after a final checkpoint and release the lease."""
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            try:
                if self.loop is not None and self.lease.held:
                    self.loop.checkpoint()
                self.lease.release()
            except Exception as err:  # pending entries stay in the stream; a successor recovers them
                logger.warning("online trainer: stop without a final checkpoint: %s", err)
        return self.stats()

    def check_health(self) -> None:
        """Serve restarts the replica when the loop thread is gone (it never exits on errors)."""
        if not self._thread.is_alive() and not self._stop.is_set():
            raise RuntimeError(f"online trainer loop thread died; last error: {self._error}")

    def __del__(self) -> None:  # Serve's graceful shutdown (redeploy, serve delete)
        if hasattr(self, "_stop") and not self._stop.is_set():
            self.stop()

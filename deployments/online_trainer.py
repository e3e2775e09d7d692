"""OnlineTrainer: a Ray actor running rerank.online.OnlineLoop (stream -> steps -> guard -> registry).

Thin: the loop, the guard and exactly-once live in rerank/online.py. The actor runs the loop
in a background thread (so `stats()`/`stop()` answer while it trains) and exports Ray metrics:
events applied, versions published, guard refusals, lag behind the stream head, and the
event -> published-weights delay (stream entry time to publish, per event). Start it with
`start_online_trainer(...)`; a killed actor is restarted by Ray (max_restarts) or by hand, and
resumes from the registry's checkpoint without losing or repeating an event.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import fields

import ray

from rerank.online import COUNTERS, OnlineConfig, OnlineLoop

logger = logging.getLogger(__name__)
DELAY_BOUNDARIES_S = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0]
ACTOR_NAME = "rerank-online-trainer"


def online_config(options: dict | None) -> OnlineConfig:
    """OnlineConfig from a dict, naming unknown keys."""
    options = dict(options or {})
    known = {f.name for f in fields(OnlineConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown online trainer option(s) {sorted(unknown)} (known: {sorted(known)})")
    return OnlineConfig(**options)


@ray.remote(num_cpus=0.5, max_restarts=-1, max_task_retries=0)
class OnlineTrainer:
    def __init__(self, redis_url: str, registry_uri: str, consumer: str = "trainer-1",
                 options: dict | None = None, stream: str = "rr:events", group: str = "online-trainer",
                 claim_idle_ms: int = 5_000, torch_threads: int = 1) -> None:
        import torch
        from ray.util.metrics import Counter, Gauge, Histogram

        from rerank.registry import ModelRegistry
        from rerank.stream import EventStream, StreamConfig

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.delays: list[float] = []  # recent per-event stream -> publish delays (s)
        self._delay_hist = Histogram("rerank_online_event_to_publish_s", boundaries=DELAY_BOUNDARIES_S,
                                     description="seconds from an event's XADD to a published version containing it")
        self._counters = {name: Counter(f"rerank_online_{name}", description=f"online trainer: {name}")
                          for name in ("events_applied", "versions_published", "guard_refusals")}
        self._lag = Gauge("rerank_online_lag_events", description="stream entries after the last checkpoint")
        self._version = Gauge("rerank_online_version", description="newest version the trainer stands on")
        stream_cfg = StreamConfig(url=redis_url, stream=stream, group=group, consumer=consumer,
                                  claim_idle_ms=claim_idle_ms)
        self.loop = OnlineLoop(EventStream(stream_cfg), ModelRegistry(registry_uri), online_config(options),
                               on_publish=self._on_publish)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: str | None = None
        self.loop.start()  # checkpoint + recovery of pending entries happen before the actor is ready
        self._seen = {name: getattr(self.loop.stats, name) for name in self._counters}
        self._thread = threading.Thread(target=self._run, name="online-loop", daemon=True)
        self._thread.start()

    def _on_publish(self, version: int, delays: list[float]) -> None:
        for d in delays:
            self._delay_hist.observe(max(0.0, d))
        self.delays.extend(delays)
        del self.delays[:-20_000]

    def _export(self) -> None:
        st = self.loop.stats
        for name, counter in self._counters.items():
            now = getattr(st, name)
            if now > self._seen[name]:
                counter.inc(now - self._seen[name])
            self._seen[name] = now
        if st.version is not None:
            self._version.set(st.version)

    def _run(self) -> None:
        last_lag = 0.0
        while not self._stop.is_set():
            try:
                with self._lock:
                    self.loop.poll_once()
                    self._export()
                if time.monotonic() - last_lag > 1.0:
                    self._lag.set(self.loop.lag())
                    last_lag = time.monotonic()
            except Exception as err:  # keep the actor alive; Redis may be restarting
                self._error = f"{type(err).__name__}: {err}"
                logger.exception("online trainer loop error")
                time.sleep(1.0)

    def stats(self) -> dict:
        """Counters, the version it stands on, lag, delay percentiles, last guard verdict."""
        import numpy as np

        with self._lock:
            out = self.loop.stats.to_dict()
            out["lag_events"] = self.loop.lag()
        d = np.asarray(self.delays[-5000:])
        out["event_to_publish_s"] = ({"p50": float(np.percentile(d, 50)), "p99": float(np.percentile(d, 99)),
                                      "n": int(len(d))} if len(d) else None)
        out["error"] = self._error
        return out

    def flush(self) -> dict:
        """Checkpoint what was consumed now (publish through the guard); returns stats."""
        with self._lock:
            self.loop.checkpoint()
        return self.stats()

    def stop(self) -> dict:
        """Stop the loop after a final checkpoint."""
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            self.loop.checkpoint()
        return self.stats()


def start_online_trainer(redis_url: str, registry_uri: str, consumer: str = "trainer-1",
                         options: dict | None = None, name: str | None = ACTOR_NAME, **kw):
    """Start the trainer actor (named and detached-free: it lives as long as the driver/cluster job)."""
    actor_opts = {"name": name, "get_if_exists": True} if name else {}
    return OnlineTrainer.options(**actor_opts).remote(redis_url, registry_uri, consumer, options, **kw)


__all__ = ["OnlineTrainer", "start_online_trainer", "online_config", "COUNTERS"]

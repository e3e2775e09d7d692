"""EventSink: rerank.eventlog.sink.StreamSink in a thread of one Serve replica (streams -> Parquet).

A Redis outage never kills the replica: the loop backs off exponentially (up to 5 s) and
recovers pending entries when Redis is back; the state and the last error show in `stats()`.
One replica; the sink's Redis lease (rerank.eventlog.sink, key `{prefix}sink:lease`) keeps a second sink
of the same streams (a redeploy's old and new replica side by side, a `rerank sink` process) on
standby: state "standby", no reads, no writes, until the holder stops or its lease lapses.
`report(name, weights)` reads an experiment's readout from the Parquet this sink writes (the
Ingress' GET /experiments/{name}/report), so the scan never runs on a serving replica.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from rerank.infra.redact import redact
from rerank.store.keys import DEFAULT_PREFIX
from rerank.eventlog.sink import SinkConfig, StreamSink

logger = logging.getLogger("ray.serve")
MAX_BACKOFF_S = 5.0


@serve.deployment(name="EventSink", num_replicas=1, ray_actor_options={"num_cpus": 0.1},
                  max_ongoing_requests=4, health_check_period_s=5, graceful_shutdown_timeout_s=30,
                  logging_config={"enable_access_log": False})
class EventSink:
    def __init__(self, redis_url: str, out_dir: str, prefix: str = DEFAULT_PREFIX, keep_days: int | None = None,
                 batch: int = 5000, flush_every_s: float = 5.0, lease_ttl_s: float = 10.0) -> None:
        self._redis_url = redis_url
        self._out_dir = out_dir
        # readouts scan Parquet for seconds: their own threads, off the event loop that answers
        # stats() and Serve's health checks, and apart from the loop thread
        self._readouts = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sink-readout")
        self.sink = StreamSink(SinkConfig(redis_url=redis_url, prefix=prefix, out_dir=out_dir, batch=batch,
                                          keep_days=keep_days, flush_every_s=flush_every_s, lease_ttl_s=lease_ttl_s))
        self.state = "running"  # running | standby | backoff | stopped
        self._backoff = 0.5
        self._error: str | None = None
        self._error_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-sink", daemon=True)
        self._thread.start()

    def _on_pass(self, counts: dict) -> None:
        state = "standby" if self.sink.standby else "running"
        if state != self.state and (state == "standby" or self.state == "standby"):
            logger.info("event sink: %s", "another sink holds the lease; standing by" if state == "standby"
                        else "took the lease; writing")
        self.state, self._backoff = state, 0.5

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sink.run(self._stop, on_pass=self._on_pass)
            except Exception as err:  # Redis unreachable, disk full: retry, never die
                self._error = redact(f"{type(err).__name__}: {err}", [self._redis_url])
                self._error_at = time.time()
                self.state = "backoff"
                logger.warning("event sink: %s; retrying in %.1f s", self._error, self._backoff)
                self._stop.wait(self._backoff)
                self._backoff = min(MAX_BACKOFF_S, self._backoff * 2)
        self.state = "stopped"

    def stats(self) -> dict:
        """State, the lease (lease_held, standby), counts and lag per stream, last flush time, last error."""
        return {**self.sink.stats(), "state": self.state, "error": self._error, "error_at": self._error_at}

    async def report(self, name: str, weights: dict[str, float] | None = None) -> dict:
        """The readout of experiment `name` from this sink's Parquet (rerank.experiments.readout),
        `weights`: its A/B arms' configured weights, for the sample ratio check."""
        from rerank.experiments.readout import load_parquet, report

        def readout() -> dict:
            return report(name, *load_parquet(self._out_dir, experiment=name), weights=weights)

        return await asyncio.get_running_loop().run_in_executor(self._readouts, readout)

    def check_health(self) -> None:
        """Serve restarts the replica when the loop thread is gone (it never exits on errors)."""
        if not self._thread.is_alive() and not self._stop.is_set():
            raise RuntimeError(f"event sink loop thread died; last error: {self._error}")

    def stop(self) -> dict:
        """Stop the loop, persist what the streams hold now in a last pass (only while holding the
        lease), then release the lease."""
        self._stop.set()
        self._thread.join(timeout=30)
        self._readouts.shutdown(wait=False)  # a readout under way finishes; no new ones
        try:
            if self.sink.lease_held:
                self.sink.run_once(block_ms=0, force=True)
        except Exception as err:  # pending entries stay in the stream; the next sink recovers them
            logger.warning("event sink: stop without a last flush: %s", redact(str(err), [self._redis_url]))
        self.sink.close()
        return self.stats()

    def __del__(self) -> None:  # Serve's graceful shutdown (redeploy, serve delete)
        if hasattr(self, "_stop") and not self._stop.is_set():
            self.stop()

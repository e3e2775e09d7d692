"""Replay a dataset's events into a running service (POST /events) in timestamp order.

Pacing: `rate` events per second, or `speed` times the dataset's own clock (gaps between
timestamps divided by `speed`, long silences capped at `max_gap_s`). Events due at the same
moment go out together in one POST (up to `batch` events); up to `concurrency` POSTs are in
flight. Event ids are deterministic (`{dataset}-{row}`), so replaying twice yields duplicates,
not double counts. A 503 (Redis down) is retried after its Retry-After, an HTTP error (no
answer) after 0.5 s (`retry_policy`); other failures are counted as errors. `on_batch(event_ids, returned_at)` lets callers (the freshness benchmark)
time each event from the moment /events returned.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import httpx
import numpy as np

from rerank.clients.retry import RetryPolicy, post_with_retries
from rerank.data.dataset import Dataset
from rerank.infra.progress import progress_bar


@dataclass
class ReplayConfig:
    url: str
    rate: float | None = None  # events per second
    speed: float | None = None  # multiple of the dataset's clock
    limit: int | None = None
    offset: int = 0  # skip the first `offset` events (in time order)
    batch: int = 50  # max events per POST
    concurrency: int = 8
    max_gap_s: float = 5.0  # with speed: a longer silence in the data is shortened to this
    original_ts: bool = False  # send the dataset's timestamps (default: let the server stamp "now")
    retries: int = 5
    timeout_s: float = 10.0
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.speed is None):
            raise ValueError("give exactly one of rate (events/s) or speed (x dataset time)")
        if (self.rate is not None and self.rate <= 0) or (self.speed is not None and self.speed <= 0):
            raise ValueError("rate/speed must be > 0")
        if self.batch < 1 or self.concurrency < 1:
            raise ValueError("batch and concurrency must be >= 1")


@dataclass
class ReplaySummary:
    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    errors: int = 0
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0
    achieved_rate: float = 0.0
    target_rate: float | None = None
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def dataset_events(dataset: Dataset, offset: int = 0, limit: int | None = None) -> list[dict]:
    """The dataset's events in timestamp order (ties: dataset order) as /events bodies."""
    ev = dataset.events
    ts = ev["ts"].to_numpy()
    order = np.argsort(ts, kind="stable")[offset:]
    if limit is not None:
        order = order[:limit]
    users = dataset.user_ids[ev["user_idx"].to_numpy()[order]]
    items = dataset.item_ids[ev["item_idx"].to_numpy()[order]]
    types = ev["event_type"].to_numpy(zero_copy_only=False)[order]
    name = dataset.meta.get("name", "data")
    return [{"event_id": f"{name}-{int(row)}", "user_id": str(u), "item_id": str(i), "type": str(t),
             "ts": float(s)} for row, u, i, t, s in zip(order, users, items, types, ts[order])]


def schedule(events: list[dict], config: ReplayConfig) -> np.ndarray:
    """Send offsets in seconds from the start for each event."""
    n = len(events)
    if config.rate is not None:
        return np.arange(n, dtype=np.float64) / config.rate
    ts = np.asarray([e["ts"] for e in events], dtype=np.float64)
    gaps = np.minimum(np.diff(ts, prepend=ts[:1] if n else ts) / config.speed, config.max_gap_s)
    return np.cumsum(np.maximum(gaps, 0.0))


def retry_policy(config: ReplayConfig) -> RetryPolicy:
    """`config.retries` retries: after any httpx error 0.5 s, after a 503 its Retry-After (1 s without one)."""
    return RetryPolicy(retries=config.retries, exceptions=(httpx.HTTPError,), backoff_s=0.5, growth=1.0,
                       retry_after_default_s=1.0)


async def _post(client: httpx.AsyncClient, events: list[dict], config: ReplayConfig, summary: ReplaySummary) -> bool:
    result = await post_with_retries(client, "/events", {"events": events}, retry_policy(config))
    summary.retries += result.retries
    if result.response is not None:
        data = result.response.json()
        summary.accepted += int(data.get("accepted", 0))
        summary.duplicates += int(data.get("duplicates", 0))
        return True
    summary.errors += len(events)
    if len(summary.error_samples) < 5:
        summary.error_samples.append(result.message)
    return False


async def replay_async(events: list[dict], config: ReplayConfig,
                       on_batch: Callable[[list[str], float], None] | None = None) -> ReplaySummary:
    """Send `events` paced by `config`; returns the summary."""
    summary = ReplaySummary(target_rate=config.rate)
    if not config.original_ts:
        events = [{k: v for k, v in e.items() if k != "ts"} for e in events]
    due = schedule(events, config) if events else np.zeros(0)
    sem = asyncio.Semaphore(config.concurrency)
    bar = progress_bar(total=len(events), desc="replay", unit="ev", enabled=config.progress, mininterval=0.5)
    tasks: set[asyncio.Task] = set()

    async def send(chunk: list[dict]) -> None:
        try:
            ok = await _post(client, chunk, config, summary)
            summary.requests += 1
            if ok and on_batch is not None:
                on_batch([e["event_id"] for e in chunk], time.time())
            bar.update(len(chunk))
        finally:
            sem.release()

    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    async with httpx.AsyncClient(base_url=config.url, timeout=config.timeout_s, limits=limits) as client:
        start = time.monotonic()
        i = 0
        while i < len(events):
            now = time.monotonic() - start
            if due[i] > now:
                await asyncio.sleep(min(due[i] - now, 0.05))
                continue
            j = i
            while j < len(events) and j - i < config.batch and due[j] <= now:
                j += 1
            await sem.acquire()  # backpressure: at most `concurrency` POSTs in flight (released by send)
            task = asyncio.create_task(send(events[i:j]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            summary.sent += j - i
            i = j
        if tasks:
            await asyncio.gather(*tasks)
        summary.seconds = time.monotonic() - start
    bar.close()
    summary.achieved_rate = summary.sent / summary.seconds if summary.seconds > 0 else 0.0
    return summary


def replay(dataset: Dataset, config: ReplayConfig, on_batch=None) -> ReplaySummary:
    """Replay `dataset` (time order, from `offset`, up to `limit` events) against `config.url`."""
    events = dataset_events(dataset, config.offset, config.limit)
    return asyncio.run(replay_async(events, config, on_batch))

"""Closed-loop HTTP load generator for /rank (httpx, asyncio; no Ray).

`run_load` keeps `concurrency` requests in flight against one URL for a fixed
duration (or request count) and reports throughput, latency percentiles,
errors and the mean scorer batch size seen in /rank responses. `compare`
runs the same load against the pipeline and a no-op endpoint, concurrency by
concurrency, and reports the throughput ratio. Bodies are serialised once up
front so the generator spends its CPU on HTTP, not JSON.

On a shared machine req/s moves with everyone else's load; `CpuMeter` adds a
steadier number when the server runs as child processes of this one (the local
stack): server CPU milliseconds per request, summed over those processes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import httpx
import numpy as np


@dataclass
class LoadConfig:
    """One load run: `concurrency` workers, each sending its next request as soon as one returns."""

    concurrency: int = 8
    duration_s: float = 10.0
    max_requests: int | None = None  # stop early after this many (None = run for duration_s)
    warmup_requests: int = 20  # sent first, not measured
    timeout_s: float = 10.0


@dataclass
class LoadResult:
    url: str
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    requests_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    mean_scorer_batch_size: float | None
    server_cpu_ms_per_request: float | None = None  # with a CpuMeter (local stack) only
    error_samples: list[str] = field(default_factory=list)


class CpuMeter:
    """CPU time used by the descendants of a process (default: this one), i.e. a local stack
    started from here: Ray's workers, Serve's proxy and replicas, Redis. The load generator
    itself (this process) is not counted."""

    def __init__(self, pid: int | None = None) -> None:
        import psutil

        self._psutil = psutil
        self._root = psutil.Process(pid)

    def snapshot(self) -> dict[int, tuple[object, float]]:
        out = {}
        for proc in self._root.children(recursive=True):
            try:
                times = proc.cpu_times()
                out[proc.pid] = (proc, times.user + times.system)
            except self._psutil.Error:
                continue
        return out

    def used_since(self, before: dict[int, tuple[object, float]]) -> float:
        """CPU seconds used since `before` by the processes alive then (new ones from 0)."""
        total = 0.0
        for pid, (proc, start) in before.items():
            try:
                times = proc.cpu_times()
                total += times.user + times.system - start
            except self._psutil.Error:
                continue
        return total


def make_rank_bodies(
    user_ids: Sequence[str],
    item_ids: Sequence[str],
    n_candidates: int,
    k: int = 20,
    n_bodies: int = 256,
    seed: int = 0,
) -> list[bytes]:
    """`n_bodies` /rank JSON bodies: a random user and `n_candidates` distinct random items each."""
    if not user_ids or not item_ids:
        raise ValueError("make_rank_bodies needs at least one user id and one item id")
    rng = np.random.default_rng(seed)
    n_candidates = min(n_candidates, len(item_ids))
    bodies = []
    for _ in range(n_bodies):
        user = user_ids[int(rng.integers(len(user_ids)))]
        picks = rng.choice(len(item_ids), size=n_candidates, replace=False)
        body = {"user_id": str(user), "candidates": [str(item_ids[i]) for i in picks], "k": k}
        bodies.append(json.dumps(body).encode())
    return bodies


def _percentile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if len(values) else None


async def run_load(url: str, bodies: Sequence[bytes], config: LoadConfig) -> LoadResult:
    """Drive POST `url` with `bodies` (round robin) at `config.concurrency`; return the measurements."""
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []
    counter = 0

    async with httpx.AsyncClient(limits=limits, timeout=config.timeout_s, headers=headers) as client:

        async def one(body: bytes, measure: bool) -> None:
            start = time.perf_counter()
            try:
                response = await client.post(url, content=body)
                ok = response.status_code == 200
                payload = response.json() if ok else None
                if not ok:
                    message = f"HTTP {response.status_code}: {response.text[:200]}"
            except (httpx.HTTPError, ValueError) as err:
                ok, payload, message = False, None, f"{type(err).__name__}: {err}"
            if not measure:
                return
            if ok:
                latencies.append((time.perf_counter() - start) * 1000.0)
                if isinstance(payload, dict) and "scorer_batch_size" in payload:
                    batch_sizes.append(int(payload["scorer_batch_size"]))
            else:
                errors.append(message)

        warm = [one(bodies[i % len(bodies)], False) for i in range(config.warmup_requests)]
        for start in range(0, len(warm), config.concurrency):
            await asyncio.gather(*warm[start : start + config.concurrency])

        deadline = time.perf_counter() + config.duration_s

        async def worker() -> None:
            nonlocal counter
            while time.perf_counter() < deadline:
                if config.max_requests is not None and counter >= config.max_requests:
                    return
                body = bodies[counter % len(bodies)]
                counter += 1
                await one(body, True)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        elapsed = time.perf_counter() - started

    lat = np.asarray(latencies)
    done = len(latencies)
    return LoadResult(
        url=url,
        concurrency=config.concurrency,
        requests=done,
        errors=len(errors),
        duration_s=round(elapsed, 3),
        requests_per_s=round(done / elapsed, 2) if elapsed > 0 else 0.0,
        p50_ms=_percentile(lat, 50),
        p90_ms=_percentile(lat, 90),
        p99_ms=_percentile(lat, 99),
        mean_ms=round(float(lat.mean()), 2) if done else None,
        mean_scorer_batch_size=round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
        error_samples=errors[:3],
    )


def compare(
    pipeline_url: str,
    noop_url: str,
    bodies: Sequence[bytes],
    concurrencies: Sequence[int],
    config: LoadConfig,
    progress: bool = True,
    cpu_meter: CpuMeter | None = None,
) -> dict:
    """Run the same load on the pipeline and on the no-op endpoint at each concurrency.

    Returns {"runs": [{"concurrency", "pipeline": LoadResult, "noop": LoadResult,
    "throughput_ratio": pipeline / noop req/s}, ...]}.
    """
    runs = []
    for concurrency in concurrencies:
        cfg = LoadConfig(**{**asdict(config), "concurrency": int(concurrency)})
        results = {}
        for name, url in (("pipeline", pipeline_url), ("noop", noop_url)):
            if progress:
                print(f"bench: {name} at concurrency {concurrency} for {cfg.duration_s:g} s ...", file=sys.stderr)
            before = cpu_meter.snapshot() if cpu_meter else None
            results[name] = asyncio.run(run_load(url, bodies, cfg))
            if cpu_meter is not None and results[name].requests:
                used = cpu_meter.used_since(before)  # includes the warm-up requests
                per = used * 1000.0 / (results[name].requests + cfg.warmup_requests)
                results[name].server_cpu_ms_per_request = round(per, 2)
        noop_rps = results["noop"].requests_per_s
        ratio = results["pipeline"].requests_per_s / noop_rps if noop_rps else None
        cpu = [results[n].server_cpu_ms_per_request for n in ("noop", "pipeline")]
        runs.append(
            {
                "concurrency": int(concurrency),
                "pipeline": asdict(results["pipeline"]),
                "noop": asdict(results["noop"]),
                "throughput_ratio": round(ratio, 3) if ratio is not None else None,
                # no-op CPU per request / pipeline CPU per request: the ratio a quiet machine would show
                "cpu_ratio": round(cpu[0] / cpu[1], 3) if None not in cpu and cpu[1] else None,
            }
        )
    return {"runs": runs}

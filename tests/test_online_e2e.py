"""The online trainer (the app's Serve deployment) over a real Redis stream, and hot swaps under /rank load."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import redis

from online_helpers import HandleCaller, synth_events, tiny_model_dir, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("online-e2e"))


def _write_events(url: str, events, prefix: str = "rr:", every_s: float = 0.0, batch: int = 20,
                  last_after: threading.Event | None = None) -> int:
    """Write `events` in chunks; with `last_after`, the last chunk waits for that event (so a kill
    the caller makes meanwhile lands mid-stream however slow the machine is)."""
    from rerank.store.events import Event
    from rerank.store.feature_store import FeatureStore

    store = FeatureStore(url, prefix=prefix)
    accepted = 0
    for lo in range(0, len(events), batch):
        chunk = events[lo : lo + batch]
        if last_after is not None and lo + batch >= len(events):
            last_after.wait(120)
        accepted += sum(store.write_events([Event(u, i, t, ts=ts, event_id=f"e2e-{lo + k}")
                                            for k, (u, i, t, ts) in enumerate(chunk)]))
        if every_s:
            time.sleep(every_s)
    store.close()
    return accepted


def _replica_actor(app: str, deployment: str):
    """The Ray actor of a Serve replica (Serve names them SERVE_REPLICA::app#deployment#id)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


def test_killing_the_trainer_replica_mid_stream_loses_and_duplicates_no_event(serve_url, redis_url, tiny, tmp_path):
    from ray import serve

    from deployments.online_trainer import OnlineTrainer
    from rerank.models.registry import ModelRegistry

    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    events = synth_events(tiny[0], 600)
    options = {"publish_every_s": 0.3, "read_count": 32}
    app = "trainer-kill"
    calls = HandleCaller()
    trainer = serve.run(OnlineTrainer.bind(redis_url, registry.uri, "rr:", options, claim_idle_ms=500, lease_ttl_s=2.0),
                        name=app, route_prefix=None)
    calls(lambda: trainer.stats.remote())  # constructed
    killed = threading.Event()
    writer = threading.Thread(target=_write_events, args=(redis_url, events),
                              kwargs={"every_s": 0.05, "last_after": killed})
    writer.start()
    try:
        _kill_mid_stream_and_check(trainer, calls, app, registry, events, killed, writer, redis_url)
    finally:  # a failure here must not leave a trainer consuming the session's stream for later tests
        killed.set()
        serve.delete(app)


def _kill_mid_stream_and_check(trainer, calls, app, registry, events, killed, writer, redis_url) -> None:
    import ray

    from deployments.online_trainer import GROUP

    wait_until(lambda: calls(lambda: trainer.stats.remote())["versions_published"] >= 2, "two published versions")
    ray.kill(_replica_actor(app, "OnlineTrainer"))  # dies mid-stream, no clean stop; Serve starts a new replica
    killed_at = registry.read_state("trainer_state.json")["events_applied"]
    killed.set()
    writer.join()
    assert 0 < killed_at < len(events)

    def caught_up():
        try:
            return calls(lambda: trainer.stats.remote(), 10).get("events_applied", 0) >= len(events)
        except Exception:
            return False  # still restarting

    wait_until(caught_up, "the new trainer replica to apply every event")
    stats = calls(lambda: trainer.flush.remote())
    assert stats["events_applied"] == len(events)  # none lost, none applied twice
    state = registry.read_state("trainer_state.json")
    assert state["events_applied"] == len(events)
    head = redis.Redis.from_url(redis_url, decode_responses=True).xrevrange("rr:events", count=1)[0][0]
    assert state["trained_until_id"] == head
    meta = registry.meta(registry.latest())
    assert meta["events_applied"] == len(events)
    assert stats["events_trained"] + stats["events_heldout"] + stats["events_invalid"] == len(events)
    pending = redis.Redis.from_url(redis_url).xpending("rr:events", GROUP)["pending"]
    assert pending == 0
    calls(lambda: trainer.stop.remote())


def test_a_second_trainer_on_the_same_stream_stands_by_until_the_first_stops(serve_url, redis_url, tiny, tmp_path):
    from ray import serve

    from deployments.online_trainer import OnlineTrainer
    from rerank.models.registry import ModelRegistry

    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    args = (redis_url, registry.uri, "lease:", {"publish_every_s": 0.3})
    calls = HandleCaller()
    first = serve.run(OnlineTrainer.bind(*args, lease_ttl_s=2.0), name="trainer-a", route_prefix=None)
    wait_until(lambda: calls(lambda: first.stats.remote())["state"] == "training", "the first trainer to train")
    second = serve.run(OnlineTrainer.bind(*args, lease_ttl_s=2.0), name="trainer-b", route_prefix=None)
    wait_until(lambda: calls(lambda: second.stats.remote())["state"] == "standby", "the second to stand by")
    assert calls(lambda: first.stats.remote())["state"] == "training"
    calls(lambda: first.stop.remote())  # releases the lease: the standby takes over without waiting for the TTL
    wait_until(lambda: calls(lambda: second.stats.remote())["state"] == "training", "the standby to take over", 20)
    calls(lambda: second.stop.remote())
    serve.delete("trainer-a")
    serve.delete("trainer-b")


def test_a_lapsed_lease_taken_again_restarts_the_loop_from_the_checkpoint(serve_url, redis_url, tiny, tmp_path):
    """Another trainer may have worked while the hold was broken: the loop's memory is stale."""
    from ray import serve

    from deployments.online_trainer import OnlineTrainer
    from rerank.store.keys import Keys
    from rerank.models.registry import ModelRegistry

    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    calls = HandleCaller()
    # a TTL longer than the loop's first start on a loaded machine: the lapse is the test's own (below)
    trainer = serve.run(OnlineTrainer.bind(redis_url, registry.uri, "lapse:", {"publish_every_s": 0.3},
                                           lease_ttl_s=10.0), name="trainer-lapse", route_prefix=None)
    wait_until(lambda: calls(lambda: trainer.stats.remote())["state"] == "training", "the trainer to train")
    assert calls(lambda: trainer.stats.remote())["lease_term"] == 1
    redis.Redis.from_url(redis_url).delete(Keys("lapse:").trainer_lease)  # the hold lapses (as past its TTL)
    wait_until(lambda: calls(lambda: trainer.stats.remote())["loop_restarts"] == 1, "the loop to restart", 20)
    stats = calls(lambda: trainer.stats.remote())
    assert stats["lease_term"] == 2 and stats["lease_held"]
    wait_until(lambda: calls(lambda: trainer.stats.remote())["state"] == "training", "training again")
    calls(lambda: trainer.stop.remote())
    serve.delete("trainer-lapse")


def test_weight_swaps_under_concurrent_rank_load_fail_no_request(serve_url, redis_server, tiny, tmp_path):
    from ray import serve

    from deployments.app import build_app, ensure_loaded
    from rerank.data.dataset import load_dataset
    from rerank.models.registry import ModelRegistry
    from rerank.clients.replay import ReplayConfig, replay

    prefix = "swap:"
    redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    ensure_loaded(redis_server.url, str(tiny[0]), prefix)
    app = build_app({"model": str(tiny[1]), "registry_uri": registry.uri, "registry_poll_s": 0.1,
                     "redis_url": redis_server.url, "redis_prefix": prefix, "ingress_batch_wait_s": 0.01,
                     "catalogue_refresh_s": 0, "allow_no_auth": True,
                     "online": {"enabled": True, "publish_every_s": 0.3, "read_count": 64}})  # the app's trainer
    serve.run(app, name="online-swap", route_prefix="/")
    url = serve_url
    trainer = serve.get_deployment_handle("OnlineTrainer", app_name="online-swap")
    calls = HandleCaller()
    calls(lambda: trainer.stats.remote())
    dataset = load_dataset(tiny[0])
    items = [str(i) for i in dataset.item_ids[1:21]]
    statuses: list[int] = []
    versions: set[str] = set()

    async def load(stop: threading.Event) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def one(i: int) -> None:
                r = await client.post("/rank", json={"user_id": f"u{i % 50}", "candidates": items, "k": 5})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add(r.json()["model_version"])

            while not stop.is_set():
                await asyncio.gather(*(one(i) for i in range(8)))

    stop = threading.Event()
    loader = threading.Thread(target=lambda: asyncio.run(load(stop)))
    loader.start()
    try:
        replayed = replay(dataset, ReplayConfig(url=url, rate=100, limit=400, batch=20, progress=False))
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_until(lambda: len(versions) >= 3, "the scorer to serve three versions during the load")
            info = client.get("/model").json()
            # the admin endpoint rolls the scorers back to v1 and pins it (the trainer pauses)
            assert client.post("/admin/rollback", json={"version": 99}).status_code == 404
            assert client.post("/admin/rollback", json={}).status_code == 422
            previous = registry.versions()[-2]  # (v1 may be pruned already: the registry keeps 10)
            rb = client.post("/admin/rollback", json={"version": previous})
            assert rb.status_code == 200 and rb.json() == {"latest": previous, "pinned": True}
            wait_until(lambda: client.get("/model").json()["version"] == f"v{previous}",
                       f"the scorer to serve v{previous} again")
            assert client.post("/admin/rollback", json={"unpin": True}).json() == {"latest": previous,
                                                                                  "pinned": False}
    finally:
        stop.set()
        loader.join()
        calls(lambda: trainer.stop.remote())
        serve.delete("online-swap")
    assert (replayed.sent, replayed.accepted, replayed.errors) == (400, 400, 0)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert len(versions) >= 3
    assert info["meta"].get("events_applied", 0) > 0
    assert info["freshness"]["events_behind_head"] is not None

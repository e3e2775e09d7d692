"""The Ingress' HTTP surface without Ray: the real FastAPI app of deployments/ingress.py driven
over ASGI (httpx.ASGITransport, or its ASGI callable with a receive() that counts), with the replica
the routes reach (routes/common.Replica) replaced by a plain object holding the real ApiKeys,
RateLimiter and Recent. What runs over real Serve is in tests/test_guarded_e2e.py and
tests/test_auth_e2e.py; this file checks what those cannot see: that the key gate answers without
reading the body, that every route maps to the scope its own authorize names, and that /healthz
asks the trainer for its lag once per second whatever the rate of calls.
"""

from __future__ import annotations

import asyncio
import json
import time
import types

import httpx
import pytest

from deployments.ingress import Ingress, IngressSettings, app
from deployments.routes.common import Recent, current_ingress, route_scope
from rerank.serving.auth import ApiKeys, RateLimiter

RANK_KEY, ADMIN_KEY = "rank-key-0123456789abcdef", "admin-key-0123456789abcdef"
BIG_RANK_BODY = json.dumps({"user_id": "u1", "candidates": [f"item-{i:07d}" for i in range(65_000)] + [""]}).encode()


class _Counter:
    def __init__(self) -> None:
        self.seen: list[dict] = []

    def inc(self, value=1, tags=None):
        self.seen.append(dict(tags or {}))


class _Trainer:
    """A trainer handle whose stats() counts its calls (the trainer counts its lag in there)."""

    def __init__(self, lag: int = 5) -> None:
        self.calls, self.lag = 0, lag
        self.stats = types.SimpleNamespace(remote=self._remote)

    def _remote(self):
        self.calls += 1

        async def answer():
            await asyncio.sleep(0.01)
            return {"state": "training", "version": "v3", "lag_events": self.lag, "error_at": None, "error": None}
        return answer()


def replica(keys: ApiKeys, *, docs: bool = False, trainer=None):
    """What the routes and the middlewares reach as the Ingress replica."""
    stub = types.SimpleNamespace(
        settings=IngressSettings(redis_url="redis://127.0.0.1:1/0", keys=keys, docs=docs),
        metrics=types.SimpleNamespace(requests=_Counter()), rate_limiter=RateLimiter(), recent=Recent(1.0),
        trainer=trainer, store=types.SimpleNamespace(ping=lambda: True))

    async def model_info(timeout_s):
        return {"version": "v3"}
    stub.model_info = model_info
    stub.authorize = types.MethodType(Ingress.func_or_class.authorize, stub)
    return stub


@pytest.fixture
def serve_with():
    """serve_with(stub) -> an httpx.AsyncClient on the app with `stub` as its replica."""
    def use(stub):
        app.dependency_overrides[current_ingress] = lambda: stub
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
    yield use
    app.dependency_overrides.pop(current_ingress, None)


def keyed(**rank_policy) -> ApiKeys:
    keys = ApiKeys.from_keys({"shop": (RANK_KEY, ["rank", "events"]), "ops": (ADMIN_KEY, ["rank", "events", "admin"])})
    if not rank_policy:
        return keys
    return ApiKeys.from_mapping({"shop": {"key": RANK_KEY, "scopes": ["rank", "events"], **rank_policy},
                                 "ops": {"key": ADMIN_KEY, "scopes": ["rank", "events", "admin"]}}, environ={})


async def _call(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes, int]:
    """The app called as an ASGI callable: (status, headers, body, receive() calls)."""
    calls = 0

    async def receive():
        nonlocal calls
        calls += 1
        return {"type": "http.request", "body": body, "more_body": False}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "root_path": "", "scheme": "http", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in
                         {"content-type": "application/json", "content-length": str(len(body)), **headers}.items()],
             "client": ("127.0.0.1", 5000), "server": ("app", 80)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return (start["status"], {k.decode(): v.decode() for k, v in start["headers"]},
            b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), calls)


def test_a_keyless_big_body_gets_401_without_its_body_being_read():
    app.dependency_overrides[current_ingress] = lambda: replica(keyed())
    try:
        status, headers, body, reads = asyncio.run(_call("POST", "/rank", {}, BIG_RANK_BODY))
        assert (status, reads) == (401, 0), body[:200]
        assert headers["www-authenticate"] == "Bearer" and json.loads(body) == {
            "detail": "missing API key; send 'Authorization: Bearer <key>'"}
        for header, expected in ((f"Bearer {'x' * 30}", 'Bearer error="invalid_token"'),
                                 ("Basic abc", 'Bearer error="invalid_request"')):
            status, headers, _, reads = asyncio.run(_call("POST", "/rank", {"authorization": header}, BIG_RANK_BODY))
            assert (status, reads, headers["www-authenticate"]) == (401, 0, expected)
        # the rank key on an admin route: 403 naming the scope, body unread
        status, headers, body, reads = asyncio.run(_call("POST", "/admin/rollback",
                                                         {"authorization": f"Bearer {RANK_KEY}"}, b'{"unpin": true}'))
        assert (status, reads) == (403, 0) and "'admin' scope" in json.loads(body)["detail"]
        assert headers["www-authenticate"] == 'Bearer error="insufficient_scope", scope="admin"'
        # with the key, the request goes on: the body is read (and this one is then refused by validation)
        status, _, body, reads = asyncio.run(_call("POST", "/rank", {"authorization": f"Bearer {RANK_KEY}"},
                                                   b'{"user_id": ""}'))
        assert status == 422 and reads >= 1
    finally:
        app.dependency_overrides.pop(current_ingress, None)


def test_without_keys_the_gate_lets_everything_through():
    app.dependency_overrides[current_ingress] = lambda: replica(ApiKeys())
    try:
        status, _, body, reads = asyncio.run(_call("POST", "/rank", {}, b'{"user_id": ""}'))
        assert status == 422 and reads >= 1  # validated, as before: auth is off
    finally:
        app.dependency_overrides.pop(current_ingress, None)


def test_every_keyed_route_maps_to_the_scope_its_authorize_names():
    """route_scope (the middleware's) against each route's own `ingress.authorize(..., SCOPE, ...)`."""
    import inspect
    import re

    from fastapi.routing import APIRoute

    from deployments.routes import admin, experiments, health, rank

    seen = set()
    for route in (r for module in (rank, health, admin, experiments) for r in module.router.routes):
        if not isinstance(route, APIRoute):
            continue
        source = inspect.getsource(route.endpoint)
        named = re.findall(r'authorize\(credentials, "(\w+)"', source)
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        gate = route_scope(path)
        if route.path == "/healthz":
            assert not named and gate is None
            continue
        assert named and gate is not None and gate[0] == named[0], (route.path, named, gate)
        seen.add(route.path)
    assert {"/rank", "/events", "/model", "/admin/rollback", "/experiments", "/experiments/{name}/report",
            "/admin/experiments/{name}", "/admin/experiments/{name}/archive"} <= seen
    assert route_scope("/openapi.json") == ("admin", "/docs") and route_scope("/openapi.json", docs_open=True) is None
    assert route_scope("/admin/no-such") == ("admin", "/admin")  # bounded metric labels
    assert route_scope("/healthz") is None and route_scope("/nope") is None


def test_docs_need_the_admin_key_with_auth_on_unless_docs_is_set(serve_with):
    async def go(stub, headers=None):
        async with serve_with(stub) as client:
            return [(await client.get(p, headers=headers)).status_code for p in ("/openapi.json", "/docs")]

    assert asyncio.run(go(replica(keyed()))) == [401, 401]
    assert asyncio.run(go(replica(keyed()), {"Authorization": f"Bearer {RANK_KEY}"})) == [403, 403]
    assert asyncio.run(go(replica(keyed()), {"Authorization": f"Bearer {ADMIN_KEY}"})) == [200, 200]
    assert asyncio.run(go(replica(keyed(), docs=True))) == [200, 200]
    assert asyncio.run(go(replica(ApiKeys()))) == [200, 200]  # auth off (local use): open


def test_a_key_over_its_rate_gets_429_with_retry_after(serve_with):
    stub = replica(keyed(rate_per_s=0.5, burst=2))

    async def go():
        async with serve_with(stub) as client:
            return [await client.get("/openapi.json", headers={"Authorization": f"Bearer {ADMIN_KEY}"})] + [
                await client.post("/rank", content=b"{", headers={"Authorization": f"Bearer {RANK_KEY}"})
                for _ in range(3)]

    admin, first, second, third = asyncio.run(go())
    assert admin.status_code == 200  # another key: its own bucket (none: no limit)
    assert (first.status_code, second.status_code) == (422, 422)  # the burst of 2 passes on (a bad body)
    assert third.status_code == 429 and third.headers["retry-after"] == "2"  # 1 token at 0.5/s, rounded up
    assert "rate limit" in third.json()["detail"] and RANK_KEY not in third.text and "shop" not in third.text
    assert {"route": "/rank", "status": "429"} in stub.metrics.requests.seen


def test_a_flood_of_healthz_calls_asks_the_trainer_once_a_second(serve_with):
    trainer = _Trainer(lag=50_000)
    stub = replica(ApiKeys(), trainer=trainer)

    async def flood(n):
        async with serve_with(stub) as client:
            return await asyncio.gather(*(client.get("/healthz") for _ in range(n)))

    started = time.monotonic()
    answers = asyncio.run(flood(100))
    assert time.monotonic() - started < 1.0  # the flood fits in the second the answer is kept
    assert trainer.calls == 1
    assert {r.status_code for r in answers} == {200}
    health = answers[0].json()
    assert health["trainer"]["lag_events"] == ">= 1000" and health["auth"] == "off"
    time.sleep(1.05)
    asyncio.run(flood(20))
    assert trainer.calls == 2  # a second later: one more


def test_recent_shares_one_call_in_flight_and_keeps_failures_for_its_ttl():
    now = [0.0]
    recent = Recent(ttl_s=1.0, clock=lambda: now[0])
    calls = []

    async def slow():
        calls.append(1)
        await asyncio.sleep(0.02)
        if len(calls) == 2:
            raise RuntimeError("down")
        return len(calls)

    async def go():
        first = await asyncio.gather(*(recent.get("k", slow) for _ in range(10)))
        now[0] = 1.5
        with pytest.raises(RuntimeError):
            await recent.get("k", slow)
        now[0] = 2.0
        with pytest.raises(RuntimeError):  # the failure is kept for the ttl too
            await recent.get("k", slow)
        now[0] = 2.6
        return first, await recent.get("k", slow)

    first, later = asyncio.run(go())
    assert first == [1] * 10 and later == 3 and len(calls) == 3


# --------------------------------------------------------------------------- the event write's retry
BUSY_SCRIPT = """local t0 = redis.call('TIME')
repeat local t = redis.call('TIME') until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) >= tonumber(ARGV[1])
return 1"""


def _write_while_redis_is_busy(store, events, redis_url: str) -> tuple[str, int]:
    """Write `events` while Redis runs a 0.35 s script: the write's reply times out (0.2 s) after
    it was sent; a client that re-sends it gets its answer once the script ends. Returns (how the
    write ended, stream entries of the events' user)."""
    import threading

    import redis

    from rerank.store import entry
    from rerank.store.events import Event

    store.write_events([Event("warm-up", "i1", "view")])  # script loaded, connection pooled
    blocker = redis.Redis.from_url(redis_url)
    busy = threading.Thread(target=lambda: blocker.eval(BUSY_SCRIPT, 0, 350_000))
    busy.start()
    time.sleep(0.05)
    try:
        outcome = f"applied {store.write_events(events)}"
    except Exception as err:
        outcome = type(err).__name__
    busy.join()
    time.sleep(0.1)
    reader = redis.Redis.from_url(redis_url, decode_responses=True)
    n = sum(1 for _, fields in reader.xrange(store.keys.events) if fields.get(entry.USER_ID) == events[0].user_id)
    return outcome, n


def test_a_timed_out_write_of_an_event_without_event_id_is_never_sent_twice(redis_url):
    from deployments.ingress import event_store
    from rerank.store.events import Event
    from rerank.store.feature_store import FeatureStore

    retrying = FeatureStore(redis_url, prefix="once:")  # the store's own client: re-sends after a timeout
    once = FeatureStore(redis_url, prefix="once:", retries=0)
    keyless = [Event("u-once", "i1", "click")]
    assert event_store(keyless, retrying, once) is once
    assert event_store([Event("u", "i1", "click", event_id="e-1")], retrying, once) is retrying
    assert event_store([Event("u", "i1", "click", event_id="e-2"), *keyless], retrying, once) is once
    # what /events does now: the write fails (503, the client decides) and the event is stored once
    assert _write_while_redis_is_busy(event_store(keyless, retrying, once), keyless, redis_url) == (
        "FeatureStoreUnavailable", 1)
    # what it did before (the retrying client for every write): "accepted", and stored twice
    assert _write_while_redis_is_busy(retrying, [Event("u-twice", "i1", "click")], redis_url) == (
        "applied [True]", 2)
    # with an event_id the retrying client is safe: the marker drops the re-sent copy
    outcome, n = _write_while_redis_is_busy(retrying, [Event("u-keyed", "i1", "click", event_id="k-1")], redis_url)
    assert n == 1, outcome


def test_rollback_runs_on_the_slow_admin_threads_and_a_hung_registry_is_a_503(serve_with, tmp_path, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import deployments.routes.admin as admin_routes
    from online_helpers import tiny_model_dir
    from rerank.models.registry import ModelRegistry

    _, model = tiny_model_dir(tmp_path)
    registry = ModelRegistry(str(tmp_path / "registry"))
    registry.publish_dir(model)
    registry.publish_dir(model)
    stub = replica(ApiKeys())
    stub.settings.registry_uri = registry.uri
    stub.model_checks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="slow-admin")
    threads = []
    real_pointer = ModelRegistry.pointer

    def pointer(self):
        threads.append(threading.current_thread().name)
        return real_pointer(self)

    monkeypatch.setattr(ModelRegistry, "pointer", pointer)

    async def post(body):
        async with serve_with(stub) as client:
            return await client.post("/admin/rollback", json=body)

    done = asyncio.run(post({"version": 1}))
    assert done.status_code == 200 and done.json() == {"latest": 1, "pinned": True}
    assert threads and all(name.startswith("slow-admin") for name in threads)

    monkeypatch.setattr(admin_routes, "ROLLBACK_TIMEOUT_S", 0.3)
    monkeypatch.setattr(ModelRegistry, "unpin", lambda self: time.sleep(1.0))  # a registry that hangs
    started = time.perf_counter()
    hung = asyncio.run(post({"unpin": True}))
    assert hung.status_code == 503 and hung.headers["retry-after"] == "1"
    assert time.perf_counter() - started < 0.9 and "did not answer" in hung.json()["detail"]
    stub.model_checks.shutdown(wait=True)

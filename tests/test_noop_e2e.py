"""The bench's references on real Serve: the no-op baseline and the hop floor answer as documented."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def references(serve_url):
    from ray import serve

    from deployments.noop import build_noop_app, build_noop_hop_app

    serve.run(build_noop_app(), name="test-noop", route_prefix="/test-noop")
    serve.run(build_noop_hop_app(), name="test-noop-hop", route_prefix="/test-noop-hop")
    yield serve_url
    for name in ("test-noop", "test-noop-hop"):
        serve.delete(name)


def test_noop_parses_the_body(references):
    body = {"user_id": "u1", "candidates": ["a", "b", "c"], "k": 2}
    answer = httpx.post(f"{references}/test-noop", content=json.dumps(body), timeout=30)
    assert answer.status_code == 200 and answer.json() == {"ok": True, "n": 3}  # three top-level fields


def test_the_hop_floor_crosses_one_hop_per_request(references):
    def post(n: int) -> dict:
        body = {"user_id": "u1", "candidates": [f"i{j}" for j in range(n)]}
        answer = httpx.post(f"{references}/test-noop-hop", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent calls share NoopScorer batches
        sizes = list(range(1, 33))
        answers = list(pool.map(post, sizes))
    assert answers == [{"ok": True, "n": n} for n in sizes]  # each request gets its own scores back
    assert httpx.post(f"{references}/test-noop-hop", content=b"", timeout=30).json() == {"ok": True, "n": 0}

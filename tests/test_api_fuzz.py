"""Schema-driven fuzzing: schemathesis generates requests for every operation of the app's own
/openapi.json (valid bodies and invalid ones, with the admin key, a rank+events key, no key and generated
Authorization headers)
against the real app on Ray Serve with a real Redis. No response may be a 5xx, and every status,
content type, header and body must be the ones the OpenAPI documents for the operation.

A few hundred cases here; `python benchmarks/fuzz.py --requests 10000` runs the same checks at scale.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO_ROOT
from online_helpers import tiny_model_dir

pytest.importorskip("schemathesis")
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
PREFIX = "fuzz:"
RANK_KEY, ADMIN_KEY = "fuzz-rank-key-0123456789abcdef", "fuzz-admin-key-0123456789abcdef"
EXAMPLES = 10  # per operation, credential and generation mode: 12 x 4 x 2 x 10 = at most 960 requests


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("rerank_bench_fuzz", REPO_ROOT / "benchmarks" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz_app(serve_url, tmp_path_factory, redis_server):
    """The app at /fuzz: API keys, and a registry of two versions so /admin/rollback has targets."""
    from ray import serve

    from deployments.app import build_app, ensure_loaded
    from rerank.models.registry import ModelRegistry

    root = tmp_path_factory.mktemp("fuzz")
    data, model = tiny_model_dir(root)
    redis_server.start()
    ensure_loaded(redis_server.url, str(data), PREFIX)
    registry = ModelRegistry(str(root / "registry"))
    registry.publish_dir(model)
    registry.publish_dir(model)
    args = {"model": str(model), "registry_uri": registry.uri, "redis_url": redis_server.url, "redis_prefix": PREFIX,
            "catalogue_refresh_s": 0, "ingress_batch_wait_s": 0.005, "online": {"enabled": False},
            "api_keys": {"shop": {"key": RANK_KEY, "scopes": ["rank", "events"]},
                         "ops": {"key": ADMIN_KEY, "scopes": ["rank", "events", "admin"]}},
            "docs": True}  # /openapi.json without a key: what the fuzzer reads
    serve.run(build_app(args), name="fuzz", route_prefix="/fuzz")
    yield f"{serve_url}/fuzz"
    serve.delete("fuzz", _blocking=False)


def test_the_openapi_documents_every_route_and_its_error_statuses(fuzz_app):
    import httpx

    doc = httpx.get(f"{fuzz_app}/openapi.json", timeout=30).json()
    paths = doc["paths"]
    assert {(p, m) for p, ops in paths.items() for m in ops} == {
        ("/rank", "post"), ("/events", "post"), ("/healthz", "get"), ("/model", "get"),
        ("/admin/rollback", "post"), ("/admin/trainer", "get"), ("/admin/sink", "get"), ("/experiments", "get"),
        ("/admin/experiments/{name}", "put"), ("/admin/experiments/{name}", "delete"),
        ("/admin/experiments/{name}/archive", "post"), ("/experiments/{name}/report", "get")}
    for path, method in [("/rank", "post"), ("/events", "post"), ("/model", "get"), ("/admin/rollback", "post"),
                         ("/admin/trainer", "get"), ("/admin/sink", "get"), ("/experiments", "get"),
                         ("/admin/experiments/{name}", "put"), ("/admin/experiments/{name}", "delete"),
                         ("/admin/experiments/{name}/archive", "post"), ("/experiments/{name}/report", "get")]:
        assert {"401", "403", "429"} <= set(paths[path][method]["responses"]), path
    for path in ("/rank", "/events"):
        assert {"413", "422", "503"} <= set(paths[path]["post"]["responses"]), path


@pytest.fixture(scope="module")
def fuzzed(fuzz_app) -> dict:
    fuzz = _fuzz_module()
    report = fuzz.fuzz(fuzz_app, fuzz.credentials(RANK_KEY, ADMIN_KEY), EXAMPLES, seed=1)
    summary = report.as_dict()
    print(json.dumps(summary, indent=2))
    return summary


def test_generated_requests_to_every_route_get_no_5xx(fuzzed):
    assert fuzzed["requests_by_operation"].keys() == {
        "POST /rank", "POST /events", "GET /healthz", "GET /model", "POST /admin/rollback", "GET /admin/trainer",
        "GET /admin/sink", "GET /experiments", "PUT /admin/experiments/{name}", "DELETE /admin/experiments/{name}",
        "POST /admin/experiments/{name}/archive", "GET /experiments/{name}/report"}
    assert fuzzed["requests"] >= 200
    server_errors = [f for f in fuzzed["failures"] if f["status"] is None or f["status"] >= 500]
    assert fuzzed["server_errors_5xx"] == 0 and fuzzed["transport_errors"] == 0, json.dumps(server_errors, indent=2)
    # every credential was answered as such: no key -> 401, the rank key -> 403 on /admin, the admin key -> 200
    assert "401" in fuzzed["by_credential"]["none"] and "403" in fuzzed["by_credential"]["rank"]
    assert "200" in fuzzed["by_credential"]["admin"]


def test_every_answer_is_documented_in_the_openapi(fuzzed):
    """Status, content type, headers and body of every response are the operation's documented ones."""
    assert fuzzed["check_failures"] == 0, json.dumps(fuzzed["failures"], indent=2)

"""Schema-driven fuzzing of the HTTP API: schemathesis generates requests from `/openapi.json`.

    python benchmarks/fuzz.py --requests 10000 --json            # starts its own stack (Redis + Ray Serve)
    python benchmarks/fuzz.py --url http://HOST:8000 --api-key K --admin-key A --max-examples 200 --json

Every operation of the OpenAPI document (/rank, /events, /healthz, /model, the /admin routes,
the experiment routes) is exercised with every credential (the admin key,
the rank+events key when given, no key, and the Authorization headers schemathesis generates
itself from the HTTPBearer security scheme) in both generation modes (positive: bodies that
fit the schema; negative: bodies that do not). Each response is checked with schemathesis'
checks: not_a_server_error (no 5xx), status_code_conformance (the status is documented for
the operation), content_type_conformance, response_schema_conformance and
response_headers_conformance. negative_data_rejection (an invalid request must get a 4xx)
is recorded separately as `schema_gaps`: it fails where the OpenAPI is looser or stricter
than the validators (e.g. ids that may be integers on the wire), which is a documentation
finding, not a server defect.

Without --url it starts its own stack (deployments.local.LocalStack on a free port, an
embedded Redis, API keys, a temporary model registry so /admin/rollback has versions), and
repeats rounds with fresh seeds until `--requests` requests have been sent. Prints progress
(tqdm) and a JSON summary (requests per operation and status, 5xx count, failing cases with
a curl command to reproduce them); writes benchmarks/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fuzz.json"
RANK_KEY, ADMIN_KEY = "fuzz-rank-key-0123456789abcdef", "fuzz-admin-key-0123456789abcdef"
MAX_FAILURES_KEPT = 50  # failing cases kept in the report (all are counted)


def strict_checks() -> list:
    """The checks a response must pass (any failure is a defect)."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
            response_headers_conformance]


def gap_checks() -> list:
    """Checks whose failures are recorded as schema gaps (OpenAPI vs validators), not asserted."""
    from schemathesis.specs.openapi.checks import negative_data_rejection

    return [negative_data_rejection]


@dataclass
class FuzzReport:
    requests: int = 0
    by_operation: dict = field(default_factory=lambda: defaultdict(Counter))  # "POST /rank" -> {status: n}
    by_credential: dict = field(default_factory=lambda: defaultdict(Counter))  # "admin" -> {status: n}
    server_errors: int = 0  # responses with status >= 500
    transport_errors: int = 0  # no response at all (connection reset, timeout)
    failures: list = field(default_factory=list)  # strict check failures (kept up to MAX_FAILURES_KEPT)
    n_failures: int = 0
    schema_gaps: Counter = field(default_factory=Counter)  # "POST /rank negative_data_rejection <status>" -> n
    gap_examples: dict = field(default_factory=dict)  # one curl per gap
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "server_errors_5xx": self.server_errors,
            "transport_errors": self.transport_errors,
            "check_failures": self.n_failures,
            "by_operation": {op: dict(sorted(c.items())) for op, c in sorted(self.by_operation.items())},
            "requests_by_operation": {op: sum(c.values()) for op, c in sorted(self.by_operation.items())},
            "by_credential": {k: dict(sorted(c.items())) for k, c in sorted(self.by_credential.items())},
            "failures": self.failures,
            "schema_gaps": dict(self.schema_gaps),
            "schema_gap_examples": self.gap_examples,
            "seconds": round(self.seconds, 1),
        }


def load_schema(base_url: str, timeout_s: float = 30.0):
    """The app's OpenAPI document, from `{base_url}/openapi.json`. The paths there are relative to
    the app's route_prefix (Serve mounts the FastAPI app under it), so requests go to base_url."""
    import schemathesis

    return schemathesis.openapi.from_url(f"{base_url.rstrip('/')}/openapi.json", wait_for_schema=timeout_s)


def operations(schema) -> list:
    ops = []
    for result in schema.get_all_operations():
        ops.append(result.ok())  # raises on an unresolvable operation: a broken schema is a failure
    return ops


def _failure_text(err: BaseException) -> str:
    parts = [str(e) for e in getattr(err, "exceptions", [])] or [str(err)]
    return " | ".join(p.strip().replace("\n", " ")[:300] for p in parts)


def fuzz_operation(report: FuzzReport, operation, base_url: str, credential: str, headers: dict | None,
                   mode: str, max_examples: int, seed: int, session, timeout_s: float = 30.0,
                   on_request: Callable[[], None] | None = None) -> int:
    """Run up to `max_examples` generated cases of one operation with one credential; returns
    how many requests were sent (hypothesis stops early when an operation has nothing to vary)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    label = f"{operation.method.upper()} {operation.path}"
    strict, gaps = strict_checks(), gap_checks()
    sent = 0

    @hyp_seed(seed)
    @settings(max_examples=max_examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def run(case):
        nonlocal sent
        if headers is not None or credential == "none":  # ours replaces (or removes) the generated one
            case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        sent += 1
        report.requests += 1
        if on_request:
            on_request()
        try:
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=timeout_s)
        except Exception as err:  # no response: as bad as a 5xx for a client
            report.transport_errors += 1
            report.by_operation[label]["no response"] += 1
            _keep(report, label, credential, mode, None, type(err).__name__ + ": " + str(err)[:200], case,
                  base_url, headers)
            return
        status = response.status_code
        report.by_operation[label][str(status)] += 1
        report.by_credential[credential][str(status)] += 1
        if status >= 500:
            report.server_errors += 1
        try:
            case.validate_response(response, checks=strict, headers=headers)
        except (Exception, BaseExceptionGroup) as err:  # schemathesis' FailureGroup is a BaseExceptionGroup
            _keep(report, label, credential, mode, status, _failure_text(err), case, base_url, headers)
        if mode != "negative":
            return
        try:
            case.validate_response(response, checks=gaps, headers=headers)
        except (Exception, BaseExceptionGroup) as err:
            detail = _failure_text(err)
            if headers is not None and "`Authorization`" in detail:
                return  # the negated Authorization header was replaced by our valid key: not a gap
            key = f"{label} {mode} -> {status}: negative_data_rejection"
            report.schema_gaps[key] += 1
            report.gap_examples.setdefault(key, {"curl": case.as_curl_command(headers=headers, base_url=base_url),
                                                 "detail": detail[:300]})

    try:
        run()
    except Unsatisfiable:  # negative mode of an operation with no parameters and no body: nothing to break
        pass
    return sent


def _keep(report: FuzzReport, label, credential, mode, status, detail, case, base_url, headers) -> None:
    report.n_failures += 1
    if len(report.failures) < MAX_FAILURES_KEPT:
        report.failures.append({"operation": label, "credential": credential, "mode": mode, "status": status,
                                "detail": detail, "curl": case.as_curl_command(headers=headers, base_url=base_url)})


def credentials(api_key: str | None, admin_key: str | None) -> dict[str, dict | None]:
    creds: dict[str, dict | None] = {}
    if admin_key:
        creds["admin"] = {"Authorization": f"Bearer {admin_key}"}
    if api_key:
        creds["rank"] = {"Authorization": f"Bearer {api_key}"}
    creds["none"] = None  # no Authorization header at all
    creds["generated"] = None  # whatever Authorization header schemathesis generates (garbage, negated)
    return creds


def fuzz(base_url: str, creds: dict[str, dict | None], max_examples: int, *, modes=("positive", "negative"),
         seed: int = 0, target_requests: int | None = None, progress: bool = False,
         report: FuzzReport | None = None) -> FuzzReport:
    """Fuzz every operation with every credential and mode, `max_examples` cases each; with
    `target_requests`, repeat rounds (seed + round) until that many requests were sent."""
    import requests

    report = report or FuzzReport()
    schema = load_schema(base_url)
    ops = operations(schema)
    bar = None
    if progress:
        from rerank.infra.progress import progress_bar

        bar = progress_bar(total=target_requests or len(ops) * len(creds) * len(modes) * max_examples, unit="req")
    started = time.perf_counter()
    session = requests.Session()
    round_ = 0
    try:
        while True:
            for op in ops:
                for name, headers in creds.items():
                    for mode in modes:
                        group = zlib.crc32(f"{op.method} {op.path} {name} {mode}".encode()) % 997
                        fuzz_operation(report, op, base_url, name, headers, mode, max_examples,
                                       seed + 1000 * round_ + group, session, on_request=bar.update if bar else None)
                        if bar:
                            bar.set_postfix(status_5xx=report.server_errors, failures=report.n_failures)
                        if round_ and report.requests >= target_requests:  # after one full round
                            return _done(report, started)
            round_ += 1
            if target_requests is None or report.requests >= target_requests:
                break
    finally:
        session.close()
        if bar:
            bar.close()
    return _done(report, started)


def _done(report: FuzzReport, started: float) -> FuzzReport:
    report.seconds += time.perf_counter() - started
    return report


# ----------------------------------------------------------------------------- own stack

def _own_stack(port: int):
    """A LocalStack with keys, a registry of two versions (rollback has a target) and the demo
    shop (generated and trained when missing)."""
    import tempfile

    from deployments.local import LocalStack, LocalStackConfig
    from rerank.infra.child_process import free_port

    registry_dir = tempfile.mkdtemp(prefix="rerank-fuzz-registry-")
    cfg = LocalStackConfig(
        port=port or free_port(), num_cpus=8, online=False,
        app_args={"api_keys": {"shop": {"key": RANK_KEY, "scopes": ["rank", "events"]},
                               "ops": {"key": ADMIN_KEY, "scopes": ["rank", "events", "admin"]}},
                  "registry_uri": registry_dir, "catalogue_refresh_s": 0,
                  "docs": True},  # the fuzzer reads the schema without a key
    )
    return LocalStack(cfg), registry_dir


def _publish_twice(registry_dir: str, model: Path) -> None:
    from rerank.models.registry import ModelRegistry

    registry = ModelRegistry(registry_dir)
    if not registry.versions():
        registry.publish_dir(model)
        registry.publish_dir(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running service (base URL of the app, its /openapi.json is read)")
    parser.add_argument("--api-key", help="a rank+events key (its cases expect 403 on /admin)")
    parser.add_argument("--admin-key", help="a key with the admin scope")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="cases per operation, credential and mode (default: from --requests)")
    parser.add_argument("--requests", type=int, default=10_000, help="total requests to send (rounds repeat)")
    parser.add_argument("--modes", default="positive,negative")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="own stack: HTTP port (default: a free one)")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary on stdout")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)

    stack = None
    if args.url:
        base_url, creds = args.url.rstrip("/"), credentials(args.api_key, args.admin_key)
    else:
        from deployments.local import DEMO_DATA, DEMO_MODEL, ensure_demo_data, ensure_model

        stack, registry_dir = _own_stack(args.port)
        model = ensure_model(ensure_demo_data(DEMO_DATA), DEMO_MODEL, stack.config.train_minutes)
        _publish_twice(registry_dir, model)
        stack.start()
        base_url, creds = stack.url, credentials(RANK_KEY, ADMIN_KEY)
        _wait_healthy(base_url)
    try:
        n_ops = len(operations(load_schema(base_url)))
        per = args.max_examples or max(10, -(-args.requests // (n_ops * len(creds) * len(modes))))
        target = None if args.max_examples and args.url else args.requests
        report = fuzz(base_url, creds, per, modes=modes, seed=args.seed, target_requests=target, progress=True)
    finally:
        if stack is not None:
            stack.stop()
    out = {"url": base_url if args.url else "own stack (LocalStack, demo shop)", "credentials": list(creds),
           "modes": list(modes), "max_examples": per, **report.as_dict()}
    from rerank.infra.results import write_results

    write_results(args.out, out)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{report.requests} requests in {report.seconds:.0f} s: {report.server_errors} 5xx, "
              f"{report.n_failures} check failures, {report.transport_errors} without a response")
        for op, statuses in out["by_operation"].items():
            print(f"  {op:22s} {statuses}")
        print(f"written to {args.out}", file=sys.stderr)
    return 1 if report.server_errors or report.n_failures or report.transport_errors else 0


def _wait_healthy(base_url: str, timeout_s: float = 240.0) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base_url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{base_url}/healthz not healthy after {timeout_s:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

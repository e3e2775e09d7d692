"""rerank.bench against a real (tiny, in-process) HTTP server: counts, errors, batch sizes, ratio."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rerank.bench import LoadConfig, compare, run_load


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path == "/fail":
            status, payload = 500, {"detail": "boom"}
        elif self.path == "/rank":
            status, payload = 200, {"items": [], "scorer_batch_size": len(body["candidates"])}
        else:
            status, payload = 200, {"ok": True}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


BODIES = [json.dumps({"user_id": "u", "candidates": ["a", "b", "c"]}).encode()]


def test_run_load_counts_requests_and_reads_batch_sizes(server):
    result = asyncio.run(run_load(f"{server}/rank", BODIES, LoadConfig(concurrency=3, duration_s=5, max_requests=30,
                                                                        warmup_requests=2)))
    assert result.requests == 30 and result.errors == 0
    assert result.mean_scorer_batch_size == 3.0
    percentiles = [result.p50_ms, result.p90_ms, result.p99_ms]
    assert percentiles == sorted(percentiles) and percentiles[0] > 0  # computed in order, not a speed check


def test_run_load_reports_errors_with_samples(server):
    result = asyncio.run(run_load(f"{server}/fail", BODIES, LoadConfig(concurrency=2, duration_s=5, max_requests=6,
                                                                        warmup_requests=0)))
    assert result.requests == 0 and result.errors == 6
    assert result.error_samples[0].startswith("HTTP 500")
    assert result.p50_ms is None and result.requests_per_s == 0.0


def test_compare_runs_both_endpoints_per_concurrency(server):
    out = compare(f"{server}/rank", f"{server}/noop", BODIES, [1, 2],
                  LoadConfig(duration_s=5, max_requests=10, warmup_requests=1), progress=False)
    assert [run["concurrency"] for run in out["runs"]] == [1, 2]
    for run in out["runs"]:
        assert run["pipeline"]["requests"] == 10 and run["noop"]["requests"] == 10
        expected = run["pipeline"]["requests_per_s"] / run["noop"]["requests_per_s"]
        assert run["throughput_ratio"] == pytest.approx(expected, abs=1e-3)
        assert run["cpu_ratio"] is None  # no CpuMeter given

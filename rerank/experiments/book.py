"""Experiments as configuration: named A/B or interleaving tests, stable salted assignment, and the
Redis-backed book the serving replicas re-read (so arms are added, ramped and stopped live).

An experiment has arms that may differ in model (a model directory, or a registry the arm's
scorers follow; an arm with `online` gets its own trainer publishing to its registry), in ranking
rules, or in nothing at all (A/A). Assignment is two hashes of the user id:

    layer point = hash("rerank-layer", user)   -> which experiment (ranges of `traffic`, in order)
    arm point   = hash(experiment salt, user)  -> which arm (by weight)

so a user stays in the same arm for as long as the experiment's salt, position and weights stay,
and the arm split of one experiment is independent of the others. A stopped experiment keeps its
traffic range (its users see the default ranking), so stopping one never moves users of the next.

The book lives in the hash `Keys(prefix).experiments` (name -> JSON of ExperimentSpec, plus
"_order" -> JSON list of names); see docs/EXPERIMENTS.md.

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
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

LAYER_SALT = "rerank-layer"
DEFAULT_ARM = "default"  # the arm of users outside every running experiment
INTERLEAVED_ARM = "interleaved"  # the arm named in impressions of an interleaving experiment
ORDER_FIELD = "_order"
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
        return "layout split serves arms that differ in rules only; per-arm models and interleaving need layout inline"
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


def check_traffic(experiments: list[Experiment]) -> None:
    total = sum(e.spec.traffic for e in experiments)
    if total > 1 + 1e-9:
        raise ValueError(f"experiments' traffic adds up to {total:g}; at most 1 (each user is in one experiment)")


def assign(user_id: str, experiments: list[Experiment]) -> Assignment:
    """The user's experiment and arm (see the module docstring)."""
    point, start = unit_point(LAYER_SALT, user_id), 0.0
    for exp in experiments:
        start += exp.spec.traffic
        if point >= start:
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
    """All experiments in the hash `key`, in their configured order."""
    raw = {k.decode() if isinstance(k, bytes) else k: v for k, v in client.hgetall(key).items()}
    order = json.loads(raw.pop(ORDER_FIELD, "[]"))
    names = [n for n in order if n in raw] + sorted(n for n in raw if n not in order)
    return [Experiment(n, ExperimentSpec.model_validate_json(raw[n])) for n in names]


def write_experiment(client, key: str, name: str, spec: ExperimentSpec) -> list[Experiment]:
    """Add or replace one experiment (a new one goes last); refuses a book over 100% traffic."""
    book = read_book(client, key)
    updated = [e if e.name != name else Experiment(name, spec) for e in book]
    if name not in {e.name for e in book}:
        updated.append(Experiment(name, spec))
    check_traffic(updated)
    client.hset(key, mapping={name: spec.model_dump_json(), ORDER_FIELD: json.dumps([e.name for e in updated])})
    return updated


def stop_experiment(client, key: str, name: str) -> ExperimentSpec | None:
    """Mark an experiment stopped (kept for the readout and its traffic range); None if unknown."""
    for exp in read_book(client, key):
        if exp.name == name:
            stopped = exp.spec.model_copy(update={"status": "stopped"})
            client.hset(key, name, stopped.model_dump_json())
            return stopped
    return None


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

"""Versioned model weights through `pyarrow.fs`: publish / latest / load / rollback / prune.

Layout under the registry root (a local directory, `file:///...`, or `s3://bucket/prefix`):

    v000001/            a model directory (the `save_model` format of rerank/recommender.py)
        config.json, weights.pt, items.parquet, ...
        meta.json       {"version", "parent", "created_at", "trained_until" (Unix s of the newest event
                        in it), "trained_until_id" (its stream id), "events_applied", ...}
                        written LAST inside the version: a version without it is incomplete
    v000002/ ...
    LATEST              {"version": N, "pinned": bool, "updated_at": ..., "reason": ...}

Commit protocol. A reader follows only `LATEST`, and `LATEST` is written after the version it
names is complete, so a reader never sees a half-written version:
- local filesystem: the version is built under a hidden temporary name and renamed to
  `vNNNNNN/` (atomic), and `LATEST` is written to `LATEST.tmp` then renamed (atomic);
- S3 (and other object stores, where a "rename" is copy + delete): the version's objects are
  uploaded in place, `meta.json` last, then `LATEST` is one PUT, which S3 applies atomically
  (readers see the old or the new object, never a mix). An interrupted upload leaves a
  `vNNNNNN/` without `meta.json`, which `versions()` ignores and the next publish overwrites.
One publisher at a time per registry (the online trainer); readers (scorers) are unlimited.

Rollback semantics. `rollback(v)` points `LATEST` at v and PINS it. While pinned, `publish`
refuses (`RegistryPinned`) unless called with `force=True`: the online trainer checks
`pinned()` and pauses (stops reading the stream, so events wait in Redis, nothing is lost).
`unpin()` (CLI `rerank model unpin`) releases it; the trainer then reloads the pinned
version's weights and continues from there, on the events it has not consumed yet (what it
learned after v from already-consumed events is dropped: that is what a rollback is for).
Pruning keeps the newest `keep` versions and never deletes the one `LATEST` points to.

Reading a remote registry (S3, ...). `local_dir(v)` downloads a version into a per-node cache,
`$RERANK_CACHE_DIR` (default ~/.cache/rerank/registry) / a hash of the URI / `vNNNNNN`, shared by
every process of the node (downloads land under a temporary name and are renamed into place),
and keeps only the newest `cache_keep` versions there. A local registry is read in place.
Replicas on any node resolve their model this way themselves (`resolve_model_dir`): nothing
passes a path that exists on one node only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from rerank.dataset import Dataset
    from rerank.recommender import Recommender

VERSION_RE = re.compile(r"^v(\d{6})$")
CACHE_ENV = "RERANK_CACHE_DIR"
STALE_PARTIAL_S = 600  # an interrupted download's temporary directory is removed after this
LATEST = "LATEST"
META = "meta.json"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown version, bad pointer, ...)."""


class RegistryPinned(RegistryError):
    """publish() while LATEST is pinned by a rollback."""


@dataclass(frozen=True)
class LatestPointer:
    version: int
    pinned: bool = False
    updated_at: float = 0.0
    reason: str = ""


def version_name(version: int) -> str:
    return f"v{int(version):06d}"


class ModelRegistry:
    """Versioned model directories under a `pyarrow.fs` URI (see the module docstring)."""

    def __init__(self, uri: str, keep: int = 10, create: bool = True, cache_dir: str | Path | None = None,
                 cache_keep: int = 3):
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        self.uri = uri
        self.keep = int(keep)
        self.cache_keep = max(1, int(cache_keep))
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self.fs, self.root = pafs.FileSystem.from_uri(uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        if create:
            self.fs.create_dir(self.root, recursive=True)
        elif self.fs.get_file_info(self.root).type == pafs.FileType.NotFound:
            raise RegistryError(f"{uri}: no registry there (nothing was ever published)")

    # ---------------------------------------------------------------- reading
    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        except FileNotFoundError:
            return None
        except OSError as err:  # pyarrow raises OSError subclasses for missing objects on S3
            if "not found" in str(err).lower() or "does not exist" in str(err).lower():
                return None
            raise

    def pointer(self) -> LatestPointer | None:
        """The LATEST pointer, or None when nothing was published yet."""
        raw = self._read_json(self._path(LATEST))
        if raw is None:
            return None
        try:
            return LatestPointer(int(raw["version"]), bool(raw.get("pinned", False)),
                                 float(raw.get("updated_at", 0.0)), str(raw.get("reason", "")))
        except (KeyError, TypeError, ValueError) as err:
            raise RegistryError(f"{self.uri}/{LATEST}: expected {{'version': int, ...}}, got {raw!r}") from err

    def latest(self) -> int | None:
        """The version serving should use (newest published, or the rolled-back one)."""
        ptr = self.pointer()
        return ptr.version if ptr else None

    def pinned(self) -> bool:
        ptr = self.pointer()
        return bool(ptr and ptr.pinned)

    def versions(self) -> list[int]:
        """Complete versions (with meta.json), ascending."""
        selector = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        found = []
        for info in self.fs.get_file_info(selector):
            m = VERSION_RE.match(info.base_name)
            if m and info.type == pafs.FileType.Directory:
                if self.fs.get_file_info(self._path(info.base_name, META)).type == pafs.FileType.File:
                    found.append(int(m.group(1)))
        return sorted(found)

    def meta(self, version: int) -> dict:
        """meta.json of a version."""
        raw = self._read_json(self._path(version_name(version), META))
        if raw is None:
            raise RegistryError(f"{self.uri}: no complete version {version} (have {self.versions()})")
        return raw

    @property
    def cache_dir(self) -> Path:
        """This node's download cache of this registry (see the module docstring)."""
        if self._cache_dir is None:
            base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rerank" / "registry"
            self._cache_dir = Path(base) / hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        return self._cache_dir

    def local_dir(self, version: int) -> Path:
        """A local model directory for `version`: the registry's own on a local FS, else the
        node cache's copy (downloaded once per node; older cached versions are pruned)."""
        src = self._path(version_name(version))
        if self.is_local:
            if version not in self.versions():
                raise RegistryError(f"{self.uri}: no complete version {version} (have {self.versions()})")
            return Path(src)
        dest = self.cache_dir / version_name(version)
        if (dest / META).is_file():
            return dest
        if self.fs.get_file_info(self._path(version_name(version), META)).type != pafs.FileType.File:
            raise RegistryError(f"{self.uri}: no complete version {version} (have {self.versions()})")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.partial")
        try:
            tmp.mkdir()
            pafs.copy_files(src, str(tmp), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            try:
                tmp.rename(dest)
            except OSError:  # another process of this node got there first
                if not (dest / META).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.prune_cache(keep_version=version)
        return dest

    def prune_cache(self, keep_version: int | None = None) -> list[int]:
        """Delete cached versions beyond the newest `cache_keep` (never `keep_version`) and
        stale partial downloads; returns the versions removed."""
        if self.is_local or not self.cache_dir.is_dir():
            return []
        cached = sorted(int(m.group(1)) for p in self.cache_dir.iterdir() if (m := VERSION_RE.match(p.name)))
        doomed = [v for v in cached[: max(0, len(cached) - self.cache_keep)] if v != keep_version]
        for v in doomed:
            shutil.rmtree(self.cache_dir / version_name(v), ignore_errors=True)
        now = time.time()
        for p in self.cache_dir.glob(".v*.partial"):
            try:
                if now - p.stat().st_mtime > STALE_PARTIAL_S:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass
        return doomed

    def load(self, version: int | None = None) -> "Recommender":
        """Load a version (default: LATEST) with rerank.recommender.load_model."""
        from rerank.recommender import load_model

        if version is None:
            version = self.latest()
            if version is None:
                raise RegistryError(f"{self.uri}: empty registry (nothing published yet)")
        return load_model(self.local_dir(version))

    # ---------------------------------------------------------------- writing
    def _write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def _set_pointer(self, ptr: LatestPointer) -> None:
        self.write_state(LATEST, {"version": ptr.version, "pinned": ptr.pinned,
                                  "updated_at": ptr.updated_at, "reason": ptr.reason})

    def publish(self, model: "Recommender", meta: dict[str, Any], dataset: "Dataset | None" = None,
                force: bool = False) -> int:
        """Write the next version (model dir + meta.json), then point LATEST at it.

        `dataset` gives save_model its item table and dataset meta; by default those of the
        current LATEST version are reused (the online trainer passes one with new items).
        """
        from rerank.recommender import save_model

        ptr = self.pointer()
        if ptr and ptr.pinned and not force:
            raise RegistryPinned(f"{self.uri}: LATEST is pinned at v{ptr.version} by a rollback; "
                                 "run `rerank model unpin` first")
        if dataset is None:
            if ptr is None:
                raise RegistryError(f"{self.uri}: the first publish needs the dataset (item table)")
            dataset = dataset_shell(self.local_dir(ptr.version))
        existing = self.versions()
        version = (max(existing) + 1) if existing else 1
        full_meta = {"version": version, "parent": ptr.version if ptr else None,
                     "created_at": time.time(), **meta}
        with tempfile.TemporaryDirectory(prefix="rerank-publish-") as tmp:
            local = Path(tmp) / version_name(version)
            save_model(model, local, dataset)
            (local / META).write_text(json.dumps(full_meta, indent=2) + "\n")
            self._upload(local, version)
        self._set_pointer(LatestPointer(version, False, time.time(), "publish"))
        self.prune()
        return version

    def publish_dir(self, model_dir: str | Path, meta: dict[str, Any] | None = None, force: bool = False) -> int:
        """Publish an existing model directory (e.g. the offline-trained model) as the next version."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise RegistryError(f"{model_dir}: not a model directory (config.json missing)")
        ptr = self.pointer()
        if ptr and ptr.pinned and not force:
            raise RegistryPinned(f"{self.uri}: LATEST is pinned at v{ptr.version} by a rollback; "
                                 "run `rerank model unpin` first")
        existing = self.versions()
        version = (max(existing) + 1) if existing else 1
        full_meta = {"version": version, "parent": ptr.version if ptr else None, "created_at": time.time(),
                     "trained_until": None, "events_applied": 0, "source": str(model_dir), **(meta or {})}
        with tempfile.TemporaryDirectory(prefix="rerank-publish-") as tmp:
            local = Path(tmp) / version_name(version)
            shutil.copytree(model_dir, local)
            (local / META).write_text(json.dumps(full_meta, indent=2) + "\n")
            self._upload(local, version)
        self._set_pointer(LatestPointer(version, False, time.time(), "publish"))
        self.prune()
        return version

    def _upload(self, local: Path, version: int) -> None:
        """Copy a finished local version dir into the registry; meta.json arrives last."""
        dest = self._path(version_name(version))
        if self.is_local:
            staging = self._path(f".{version_name(version)}.{uuid.uuid4().hex}.partial")
            shutil.copytree(local, staging)
            self.fs.move(staging, dest)  # rename(2) of a directory: atomic
            return
        self.fs.delete_dir_contents(dest, missing_dir_ok=True)
        self.fs.create_dir(dest, recursive=True)  # object stores: a no-op marker; filesystems with directories need it
        for path in sorted(local.rglob("*"), key=lambda p: p.name == META):  # meta.json last
            if path.is_dir():
                self.fs.create_dir(f"{dest}/{path.relative_to(local).as_posix()}", recursive=True)
            elif path.is_file():
                self._write_bytes(f"{dest}/{path.relative_to(local).as_posix()}", path.read_bytes())

    def read_state(self, name: str) -> dict | None:
        """A small JSON state file at the registry root (e.g. the online trainer's checkpoint)."""
        return self._read_json(self._path(name))

    def write_state(self, name: str, state: dict) -> None:
        """Write a JSON state file atomically (rename on a local FS, one PUT on S3)."""
        data = json.dumps(state).encode()
        if self.is_local:
            tmp = self._path(f".{name}.{uuid.uuid4().hex}.tmp")
            self._write_bytes(tmp, data)
            self.fs.move(tmp, self._path(name))
        else:
            self._write_bytes(self._path(name), data)

    def rollback(self, version: int, reason: str = "rollback") -> None:
        """Point LATEST at an existing version and pin it (see the module docstring)."""
        if version not in self.versions():
            raise RegistryError(f"{self.uri}: cannot roll back to v{version}: have {self.versions()}")
        self._set_pointer(LatestPointer(int(version), True, time.time(), reason))

    def unpin(self) -> None:
        """Release a rollback pin; the trainer continues from the pinned version."""
        ptr = self.pointer()
        if ptr is None:
            raise RegistryError(f"{self.uri}: empty registry")
        self._set_pointer(LatestPointer(ptr.version, False, time.time(), "unpin"))

    def prune(self) -> list[int]:
        """Delete all but the newest `keep` versions, never the one LATEST points to."""
        versions = self.versions()
        latest = self.latest()
        doomed = [v for v in versions[: max(0, len(versions) - self.keep)] if v != latest]
        for v in doomed:
            self.fs.delete_dir(self._path(version_name(v)))
        return doomed

    def describe(self) -> list[dict]:
        """One row per version: meta plus whether LATEST points to it."""
        ptr = self.pointer()
        rows = []
        for v in self.versions():
            m = self.meta(v)
            rows.append({"version": v, "latest": bool(ptr and ptr.version == v),
                         "pinned": bool(ptr and ptr.version == v and ptr.pinned),
                         "created_at": m.get("created_at"), "parent": m.get("parent"),
                         "trained_until": m.get("trained_until"), "trained_until_id": m.get("trained_until_id"),
                         "events_applied": m.get("events_applied")})
        return rows


def resolve_model_dir(model: str | None, registry_uri: str | None) -> tuple[Path, int | None]:
    """The model directory a replica serves, resolved on the replica's own node.

    The registry's LATEST when `registry_uri` is given and holds a version (downloaded into the
    node cache for a remote registry), else `model` (a path that must exist on this node: local
    runs, or storage shared by every node). Returns (directory, registry version or None).
    """
    if registry_uri:
        registry = ModelRegistry(registry_uri)
        version = registry.latest()
        if version is not None:
            return registry.local_dir(version), version
    if not model:
        raise RegistryError(f"registry {registry_uri} has no published version and no model directory was given")
    path = Path(model)
    if not (path / "config.json").is_file():
        raise RegistryError(f"{model}: not a model directory on this node (config.json missing)")
    return path, None


def dataset_shell(model_dir: Path, items=None) -> "Dataset":
    """A Dataset carrying only what save_model needs (meta + item table) from a model directory.

    `items` (a pyarrow table in the items.parquet schema) replaces the model's item table,
    e.g. with items that appeared online.
    """
    import pyarrow.parquet as pq

    from rerank.dataset import EVENTS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA, Dataset

    config = json.loads((model_dir / "config.json").read_text())
    if items is None:
        items = pq.read_table(model_dir / "items.parquet").cast(ITEMS_SCHEMA)
    meta = dict(config.get("dataset") or {})
    meta["n_items"] = items.num_rows
    meta.setdefault("n_users", 0)
    meta.setdefault("n_attributes", 0)
    meta.setdefault("has_timestamps", True)
    return Dataset(model_dir, meta, USERS_SCHEMA.empty_table(), items, EVENTS_SCHEMA.empty_table())

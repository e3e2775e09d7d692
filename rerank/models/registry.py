"""Versioned model weights through `pyarrow.fs`: publish / latest / load / rollback / prune.

Layout under the registry root (a local directory, `file:///...`, or `s3://bucket/prefix`):

    v000001/            a model directory (the `save_model` format of rerank/models/recommender.py)
        config.json, weights.pt, items.parquet, ...
        meta.json       {"version", "parent", "created_at", "trained_until" (Unix s of the newest event
                        in it), "trained_until_id" (its stream id), "events_applied", ...}
                        written LAST inside the version: a version without it is incomplete
    v000002/ ...
    LATEST              {"version": N, "pinned": bool, "updated_at": ..., "reason": ...}

Commit protocol. A reader follows only `LATEST`, and `LATEST` is written after the version it
names is complete, so a reader never sees a half-written version. A version is complete when
its `meta.json` is present and readable (a JSON object); `versions()` lists complete versions only.
- local filesystem: the version is built under a hidden temporary name, every file and
  directory of it is fsynced, it is renamed to `vNNNNNN/` (atomic) and the registry directory is
  fsynced (the rename itself made durable); only then is `LATEST` written: to a hidden temporary
  file, flushed, fsynced, renamed over `LATEST` (atomic), and the directory fsynced again. So a
  crash (power loss included) leaves `LATEST` old or new, never empty, and never naming a version
  whose files did not reach the disk. `write_state` files (the trainer's checkpoint) get the same;
- S3 (and other object stores, where a "rename" is copy + delete): the version's objects are
  uploaded in place, `meta.json` last, then `LATEST` is one PUT, which S3 applies atomically
  (readers see the old or the new object, never a mix) and durably once it returns: there is
  nothing to fsync. An interrupted upload leaves a `vNNNNNN/` without `meta.json`, which
  `versions()` ignores and the next publish overwrites (on a local registry too: an incomplete
  directory where the next version goes is moved away first).
One publisher at a time per registry (the online trainer); readers (scorers) are unlimited.

Recovery of a bad pointer. `pointer()` (so `latest()`, `pinned()`, `load()`) never raises on a
bad `LATEST`; it falls back to the newest complete version, logs a warning (once per problem
per registry object) and says so in the pointer's `recovered` and `reason`:
- `LATEST` unreadable (empty, truncated, not JSON, not {"version": int >= 1, ...}), e.g. written
  before the fsyncs above by a registry that lost power: `recovered="unreadable"`, and it reads
  as PINNED. An unreadable pointer cannot tell whether it was a rollback's pin; reading it as
  pinned is the safe side: the online trainer pauses (events wait in Redis, nothing is lost)
  and `publish` refuses without `force`, instead of publishing over what may have been an
  operator's rollback of a bad model; `prune` deletes nothing meanwhile (the pin target may be
  any version). Reading it unpinned would resume learning on top of a possibly rolled-back
  line and could prune the rollback target. Serving uses the newest complete version either way;
- `LATEST` names a version that is missing or incomplete (deleted by hand, or its files lost):
  `recovered="incomplete"`, pinned as the pointer says (it was readable), `named` = the version
  it names (the next publish takes a number above it, so the stale pointer never turns into a
  reference to a new version before its commit).
The next successful write of the pointer repairs `LATEST`: `rollback`, `unpin` (which rewrites
it, unpinned, at the version read, i.e. the newest complete one) or a publish (with `force`
while it reads as pinned). A missing `LATEST` still means "nothing published yet" (None).

The commit is conditional. `publish` notes LATEST when it starts, uploads (seconds on S3), then
re-reads LATEST immediately before writing it: if LATEST became pinned meanwhile (a rollback)
it raises `RegistryPinned`; if LATEST moved to another version (someone else published or
rolled back and unpinned) it raises `RegistryConflict` (a subclass of `RegistryPinned`, so a
caller that backs off on a pin backs off here too); `force=True` skips both checks. The
uploaded version then stays as a complete but unreferenced version (nothing serves it; it is
listed, can be rolled back to, and `prune` removes it once it falls out of the retention below);
the next publish takes the next number. Every read-LATEST-then-write (publish's commit,
`rollback`, `unpin`) and `prune` run under a lock:
- local filesystem: `flock(2)` on `.LATEST.lock` at the registry root, so those operations are
  serialised between processes and threads exactly (a crashed holder's lock is released by the
  kernel: no stale lock files). Not on network filesystems without working flock.
- S3: no lock (pyarrow.fs exposes no conditional PUT / If-Match, which S3 itself has), so a
  small window remains: a pin written between publish's re-read of LATEST and its PUT of LATEST
  (milliseconds, not the seconds of the upload) is overwritten; likewise a rollback to a version
  between prune's re-read of LATEST and its delete of that version.

Rollback semantics. `rollback(v)` points `LATEST` at v and PINS it. While pinned, `publish`
refuses (`RegistryPinned`) unless called with `force=True`: the online trainer checks
`pinned()` and pauses (stops reading the stream, so events wait in Redis, nothing is lost).
`unpin()` (CLI `rerank model unpin`) releases it; the trainer then reloads the pinned
version's weights and continues from there, on the events it has not consumed yet (what it
learned after v from already-consumed events is dropped: that is what a rollback is for).

Retention (`prune`, run after every publish). A version is kept if any of these holds:
- LATEST points to it (pinned or not): the served / pinned version;
- it is among the newest `keep` versions (default 10; at least 1, so numbers are never reused);
- it is among the newest `keep_offline` offline versions (default 2): versions whose meta has no
  `trained_until_id`, i.e. not produced by the online trainer (publish_dir of an offline-trained
  model, `rerank model publish`). The newest is the baseline the online line descends from; the
  one before stays as a rollback target when a fresh offline model turns out bad. Not all of
  them: each is a full model and offline retrains accumulate without bound;
- it is the newest (by `created_at`) version of its clock hour, for hours within `keep_hourly_s`
  of now (default 24 h): at ~2 publishes/s the newest 10 versions span seconds, so this is the
  rollback history ("the model of an hour ago"). Versions without a numeric `created_at` are
  not kept by this rule.
Deleting a version makes it invisible at once (local: renamed to a hidden name, then removed
outside the lock; object store: its `meta.json` is deleted first, so it turns incomplete).

Reading a remote registry (S3, ...). `local_dir(v)` downloads a version into a per-node cache,
`$RERANK_CACHE_DIR` (default ~/.cache/rerank/registry) / a hash of the URI / `vNNNNNN`, shared by
every process of the node (downloads land under a temporary name and are renamed into place),
and keeps only the newest `cache_keep` versions there. A local registry is read in place.
Replicas on any node resolve their model this way themselves (`resolve_model_dir`): nothing
passes a path that exists on one node only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process lock on a local registry (see the module docstring)
    fcntl = None

if TYPE_CHECKING:
    from rerank.data.dataset import Dataset
    from rerank.models.recommender import Recommender

VERSION_RE = re.compile(r"^v(\d{6})$")
CACHE_ENV = "RERANK_CACHE_DIR"
STALE_PARTIAL_S = 600  # an interrupted download's temporary directory is removed after this
LATEST = "LATEST"
META = "meta.json"
LOCK_FILE = ".LATEST.lock"
LOCK_TIMEOUT_S = 60.0  # waiting longer than this for the pointer lock raises RegistryError
HOUR_S = 3600
UNREADABLE = "unreadable"  # LatestPointer.recovered: LATEST could not be parsed (see the module docstring)
INCOMPLETE = "incomplete"  # LatestPointer.recovered: LATEST names a missing or incomplete version
RECOVERY_RELIST_S = 5.0  # while LATEST stays bad, the fallback's listing is redone at most this often

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown version, bad pointer, ...)."""


class RegistryPinned(RegistryError):
    """publish() while LATEST is pinned by a rollback (checked at the start and at the commit)."""


class RegistryConflict(RegistryPinned):
    """publish() whose commit found LATEST moved to another version since the publish started."""


@dataclass(frozen=True)
class LatestPointer:
    version: int
    pinned: bool = False
    updated_at: float = 0.0
    reason: str = ""
    recovered: str = ""  # "" = LATEST as written; UNREADABLE / INCOMPLETE = a fallback (module docstring)
    named: int | None = None  # for INCOMPLETE: the version LATEST names (missing or incomplete)


def _written(ptr: LatestPointer | None) -> Any:
    """What LATEST says (not the fallback read from it): publish's commit compares these."""
    if ptr is None:
        return None
    if ptr.recovered == INCOMPLETE:
        return ptr.named
    return (UNREADABLE,) if ptr.recovered == UNREADABLE else ptr.version


def _parse_pointer(raw: Any) -> LatestPointer | None:
    """LATEST's JSON as a pointer, or None when it does not have the expected shape."""
    if not isinstance(raw, dict):
        return None
    version = raw.get("version")
    if isinstance(version, bool) or not isinstance(version, (int, str)):
        return None
    try:
        ptr = LatestPointer(int(version), bool(raw.get("pinned", False)), float(raw.get("updated_at", 0.0)),
                            str(raw.get("reason", "")))
    except (TypeError, ValueError):
        return None
    return ptr if ptr.version >= 1 else None


def version_name(version: int) -> str:
    return f"v{int(version):06d}"


class ModelRegistry:
    """Versioned model directories under a `pyarrow.fs` URI (see the module docstring)."""

    def __init__(self, uri: str, keep: int = 10, create: bool = True, cache_dir: str | Path | None = None,
                 cache_keep: int = 3, keep_hourly_s: float = 24 * HOUR_S, keep_offline: int = 2):
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        self.uri = uri
        self.keep = int(keep)  # newest versions kept by prune (at least 1 is, whatever this says)
        self.keep_hourly_s = float(keep_hourly_s)  # one version per clock hour this far back is kept
        self.keep_offline = int(keep_offline)  # newest offline versions (no trained_until_id) kept
        self._lock = threading.RLock()
        self._lock_depth = 0
        # complete versions' meta (immutable once complete), with the (mtime, size) it was read at
        self._meta_cache: dict[int, tuple[Any, dict]] = {}
        self._warned = ""  # the pointer problem last logged (logged again only when it changes)
        self._fallback: tuple[str, float, int | None] = ("", 0.0, None)  # (problem, when, newest complete)
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

    def _read_pointer(self) -> tuple[LatestPointer | None, str]:
        """(LATEST as written, "") or (None, "") when absent, or (None, why) when unreadable."""
        try:
            raw = self._read_json(self._path(LATEST))
        except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
            return None, f"not JSON ({type(err).__name__}: {str(err)[:80]})"
        if raw is None:
            return None, ""
        ptr = _parse_pointer(raw)
        if ptr is None:
            return None, f"expected {{'version': int >= 1, ...}}, got {str(raw)[:80]!r}"
        return ptr, ""

    def pointer(self) -> LatestPointer | None:
        """The LATEST pointer, or None when nothing was published yet. An unreadable LATEST, or one
        naming a missing or incomplete version, falls back to the newest complete version (with a
        logged warning; see "Recovery of a bad pointer" in the module docstring)."""
        for _ in range(2):
            ptr, problem = self._read_pointer()
            if problem:
                return self._recovered(UNREADABLE, f"{LATEST} unreadable: {problem}", pinned=True)
            if ptr is None:
                return None
            if self._complete(ptr.version):
                self._warned = ""
                return ptr
            # re-read once: LATEST may have moved on while its old version was being pruned
        return self._recovered(INCOMPLETE, f"{LATEST} names v{ptr.version}, which is missing or incomplete",
                               pinned=ptr.pinned, named=ptr.version)

    def _recovered(self, kind: str, problem: str, pinned: bool, named: int | None = None) -> LatestPointer | None:
        """The fallback pointer: the newest complete version (None when there is none). The listing
        is reused for RECOVERY_RELIST_S while the problem stays (scorers poll LATEST every 0.2 s)."""
        seen, when, fallback = self._fallback
        if seen != problem or time.monotonic() - when > RECOVERY_RELIST_S or (
                fallback is not None and not self._complete(fallback)):
            versions = self.versions()
            fallback = versions[-1] if versions else None
            self._fallback = (problem, time.monotonic(), fallback)
        if problem != self._warned:
            self._warned = problem
            then = (f"serving the newest complete version v{fallback}" if fallback is not None
                    else "no complete version to fall back to")
            pin = ("; read as pinned (publish refuses, the trainer pauses) until `rerank model unpin` or a "
                   "rollback rewrites it" if kind == UNREADABLE else "")
            log.warning("model registry %s: %s; %s%s", self.uri, problem, then, pin)
        if fallback is None:
            return None
        return LatestPointer(fallback, pinned, 0.0, f"recovered: {problem}", kind, named)

    def latest(self) -> int | None:
        """The version serving should use (newest published, or the rolled-back one)."""
        ptr = self.pointer()
        return ptr.version if ptr else None

    def pinned(self) -> bool:
        ptr = self.pointer()
        return bool(ptr and ptr.pinned)

    def _complete(self, version: int) -> bool:
        """Whether `version` is complete: its meta.json present and a readable JSON object. One
        stat / HEAD per call; the file is read once per (mtime, size) and cached."""
        path = self._path(version_name(version), META)
        info = self.fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            self._meta_cache.pop(version, None)
            return False
        stamp = (info.mtime, info.size)
        cached = self._meta_cache.get(version)
        if cached is not None and cached[0] == stamp:
            return True
        try:
            raw = self._read_json(path)
        except (ValueError, UnicodeDecodeError):  # empty or truncated (lost in a crash)
            raw = None
        if not isinstance(raw, dict):
            self._meta_cache.pop(version, None)
            return False
        self._meta_cache[version] = (stamp, raw)
        return True

    def versions(self) -> list[int]:
        """Complete versions (meta.json present and readable), ascending."""
        selector = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        found = []
        for info in self.fs.get_file_info(selector):
            m = VERSION_RE.match(info.base_name)
            if m and info.type == pafs.FileType.Directory and self._complete(int(m.group(1))):
                found.append(int(m.group(1)))
        return sorted(found)

    def meta(self, version: int) -> dict:
        """meta.json of a complete version."""
        if not self._complete(version):
            raise RegistryError(f"{self.uri}: no complete version {version} (have {self.versions()})")
        return dict(self._meta_cache[version][1])

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
        remove_stale_partials(self.cache_dir)
        return doomed

    def load(self, version: int | None = None) -> "Recommender":
        """Load a version (default: LATEST) with rerank.models.recommender.load_model."""
        from rerank.models.recommender import load_model

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

    @contextmanager
    def _pointer_lock(self):
        """Serialise read-LATEST-then-write and prune (see the module docstring). Re-entrant in a
        thread; an inter-process flock on a local registry, nothing more on an object store."""
        with self._lock:
            if self._lock_depth or not self.is_local or fcntl is None:
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            fd = os.open(self._path(LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                deadline = time.monotonic() + LOCK_TIMEOUT_S
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise RegistryError(f"{self.uri}: {LOCK_FILE} held by another process "
                                                f"for over {LOCK_TIMEOUT_S:.0f} s") from None
                        time.sleep(0.005)
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
            finally:
                os.close(fd)  # releases the flock

    def _refuse_if_pinned(self, ptr: LatestPointer | None, force: bool) -> None:
        if ptr and ptr.pinned and not force:
            if ptr.recovered == UNREADABLE:
                raise RegistryPinned(f"{self.uri}: LATEST is unreadable and reads as pinned (it may have been a "
                                     f"rollback); serving v{ptr.version}; run `rerank model unpin` (or roll back) "
                                     "to rewrite it")
            raise RegistryPinned(f"{self.uri}: LATEST is pinned at v{ptr.version} by a rollback; "
                                 "run `rerank model unpin` first")

    def _commit(self, version: int, started: LatestPointer | None, force: bool) -> None:
        """Point LATEST at a complete, uploaded `version` unless LATEST changed since `started`."""
        with self._pointer_lock():
            now = self.pointer()
            if not force:
                left = f"v{version} stays uploaded but unreferenced"
                if now and now.pinned:
                    raise RegistryPinned(f"{self.uri}: LATEST was pinned at v{now.version} by a rollback while "
                                         f"publishing; {left}; run `rerank model unpin` first")
                if _written(now) != _written(started):
                    before = started.version if started else None
                    raise RegistryConflict(f"{self.uri}: LATEST moved from v{before} to "
                                           f"v{now.version if now else None} while publishing; {left}")
            self._set_pointer(LatestPointer(version, False, time.time(), "publish"))

    def _publish_built(self, build, meta: dict[str, Any], ptr: LatestPointer | None, force: bool) -> int:
        """Build a version locally with build(dir), upload it, commit LATEST, prune."""
        existing = self.versions()
        # never a number a stale LATEST names (it would be referenced before its commit)
        version = max([*existing, (ptr.named or 0) if ptr else 0, 0]) + 1
        full_meta = {"version": version, "parent": ptr.version if ptr else None, "created_at": time.time(), **meta}
        with tempfile.TemporaryDirectory(prefix="rerank-publish-") as tmp:
            local = Path(tmp) / version_name(version)
            build(local)
            (local / META).write_text(json.dumps(full_meta, indent=2) + "\n")
            self._upload(local, version)
        self._commit(version, ptr, force)
        self.prune()
        return version

    def publish(self, model: "Recommender", meta: dict[str, Any], dataset: "Dataset | None" = None,
                force: bool = False) -> int:
        """Write the next version (model dir + meta.json), then point LATEST at it.

        `dataset` gives save_model its item table and dataset meta; by default those of the
        current LATEST version are reused (the online trainer passes one with new items).
        Raises RegistryPinned if LATEST is pinned when it starts or at the commit, and
        RegistryConflict if LATEST moved meanwhile (see the module docstring); `force` overrides.
        """
        from rerank.models.recommender import save_model

        ptr = self.pointer()
        self._refuse_if_pinned(ptr, force)
        if dataset is None:
            if ptr is None:
                raise RegistryError(f"{self.uri}: the first publish needs the dataset (item table)")
            dataset = dataset_shell(self.local_dir(ptr.version))
        return self._publish_built(lambda local: save_model(model, local, dataset), meta, ptr, force)

    def publish_dir(self, model_dir: str | Path, meta: dict[str, Any] | None = None, force: bool = False) -> int:
        """Publish an existing model directory (e.g. the offline-trained model) as the next version."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise RegistryError(f"{model_dir}: not a model directory (config.json missing)")
        ptr = self.pointer()
        self._refuse_if_pinned(ptr, force)
        full_meta = {"trained_until": None, "events_applied": 0, "source": str(model_dir), **(meta or {})}
        return self._publish_built(lambda local: shutil.copytree(model_dir, local), full_meta, ptr, force)

    def _upload(self, local: Path, version: int) -> None:
        """Copy a finished local version dir into the registry; meta.json arrives last."""
        dest = self._path(version_name(version))
        if self.is_local:
            staging = self._path(f".{version_name(version)}.{uuid.uuid4().hex}.partial")
            shutil.copytree(local, staging)
            fsync_tree(staging)  # the files' data and the directory entries on disk before the rename
            trash = None
            if os.path.lexists(dest):  # an incomplete version (versions() skips it): its number is taken over
                if self._complete(version):
                    raise RegistryConflict(f"{self.uri}: v{version} appeared while publishing (another publisher?)")
                trash = self._path(f".{version_name(version)}.{uuid.uuid4().hex}.deleting")
                os.rename(dest, trash)
            os.rename(staging, dest)  # rename(2) of a directory: atomic
            fsync_dir(self.root)  # the rename on disk before LATEST can name the version
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
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
        """Write a JSON state file atomically and durably: on a local FS a temporary file, flushed
        and fsynced, renamed over the old one, then the directory fsynced; on S3 one PUT (atomic
        and durable once it returns: nothing to fsync)."""
        data = json.dumps(state).encode()
        if not self.is_local:
            self._write_bytes(self._path(name), data)
            return
        tmp = self._path(f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(name))
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        fsync_dir(self.root)

    def rollback(self, version: int, reason: str = "rollback") -> None:
        """Point LATEST at an existing version and pin it (see the module docstring)."""
        with self._pointer_lock():
            if version not in self.versions():
                raise RegistryError(f"{self.uri}: cannot roll back to v{version}: have {self.versions()}")
            self._set_pointer(LatestPointer(int(version), True, time.time(), reason))

    def unpin(self) -> None:
        """Release a rollback pin; the trainer continues from the pinned version."""
        with self._pointer_lock():
            ptr = self.pointer()
            if ptr is None:
                raise RegistryError(f"{self.uri}: empty registry")
            self._set_pointer(LatestPointer(ptr.version, False, time.time(), "unpin"))

    def _prune_meta(self, version: int) -> dict:
        cached = self._meta_cache.get(version)
        return cached[1] if cached is not None else self.meta(version)

    def retained(self, versions: list[int] | None = None, now: float | None = None) -> set[int]:
        """The versions the retention rules keep (see the module docstring)."""
        versions = sorted(self.versions() if versions is None else versions)
        now = time.time() if now is None else now
        keep = set(versions[-max(1, self.keep):])
        ptr = self.pointer()
        if ptr is not None:
            keep.add(ptr.version)
        metas = {v: self._prune_meta(v) for v in versions}
        if self.keep_offline > 0:
            offline = [v for v in versions if metas[v].get("trained_until_id") is None]
            keep.update(offline[-self.keep_offline:])
        newest_of_hour: dict[int, tuple[float, int]] = {}
        for v in versions if self.keep_hourly_s > 0 else []:
            created = metas[v].get("created_at")
            dated = isinstance(created, (int, float)) and not isinstance(created, bool)
            if dated and now - created <= self.keep_hourly_s:
                hour = int(created // HOUR_S)
                newest_of_hour[hour] = max(newest_of_hour.get(hour, (created, v)), (created, v))
        keep.update(v for _, v in newest_of_hour.values())
        return keep

    def _delete_version(self, version: int) -> str | None:
        """Make a version invisible at once; returns a hidden directory still to delete (local FS)."""
        path = self._path(version_name(version))
        self._meta_cache.pop(version, None)
        if self.is_local:  # rename away: atomic, and a half-deleted dir is never seen as vNNNNNN/
            trash = self._path(f".{version_name(version)}.{uuid.uuid4().hex}.deleting")
            self.fs.move(path, trash)
            return trash
        self.fs.delete_file(f"{path}/{META}")  # incomplete from here on: versions() skips it
        self.fs.delete_dir(path)
        return None

    def prune(self) -> list[int]:
        """Delete the versions the retention rules do not keep; returns them.

        LATEST is re-read right before each deletion (on an object store a rollback may land
        while pruning: see the module docstring); on a local registry the pointer lock makes
        prune and rollback exclusive.
        """
        deleted, trash = [], []
        with self._pointer_lock():
            ptr = self.pointer()
            if ptr is not None and ptr.recovered == UNREADABLE:
                log.warning("model registry %s: not pruning while LATEST is unreadable (it may have pinned any "
                            "version)", self.uri)
                return []
            versions = self.versions()
            keep = self.retained(versions)
            for v in (v for v in versions if v not in keep):
                ptr = self.pointer()
                if ptr is not None and ptr.version == v:
                    continue  # pinned (or published) since the decision
                trash.append(self._delete_version(v))
                deleted.append(v)
        for path in trash:  # out of the lock: a rollback waits for the renames only
            if path is not None:
                self.fs.delete_dir(path)
        if self.is_local:  # staging copies a killed publisher left behind
            remove_stale_partials(Path(self.root))
        return deleted

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


def fsync_dir(path: str | Path) -> None:
    """fsync a directory (its entries: files created or renamed in it). A no-op where directories
    cannot be opened (Windows) or the filesystem does not support it (EINVAL, ENOTSUP)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under `root`, then every directory, deepest first (`root` last)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def remove_stale_partials(directory: Path) -> None:
    """Delete `.v*.partial` directories (an interrupted download or staging copy) older than
    STALE_PARTIAL_S; a younger one may still be in progress."""
    now = time.time()
    for p in directory.glob(".v*.partial"):
        try:
            if now - p.stat().st_mtime > STALE_PARTIAL_S:
                shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:
            pass


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

    from rerank.data.dataset import EVENTS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA, Dataset

    config = json.loads((model_dir / "config.json").read_text())
    if items is None:
        items = pq.read_table(model_dir / "items.parquet").cast(ITEMS_SCHEMA)
    meta = dict(config.get("dataset") or {})
    meta["n_items"] = items.num_rows
    meta.setdefault("n_users", 0)
    meta.setdefault("n_attributes", 0)
    meta.setdefault("has_timestamps", True)
    return Dataset(model_dir, meta, USERS_SCHEMA.empty_table(), items, EVENTS_SCHEMA.empty_table())

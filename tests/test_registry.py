"""ModelRegistry: publish / latest / load / rollback / prune on a local directory, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rerank.models.recommender import load_model
from rerank.models.registry import ModelRegistry, RegistryConflict, RegistryError, RegistryPinned

from online_helpers import tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("registry"))


def _perturbed(model_dir, scale: float):
    model = load_model(model_dir)
    with torch.no_grad():
        model.module.item_emb.weight.mul_(scale)
    return model


def test_publish_latest_load_and_meta(tiny, tmp_path):
    reg = ModelRegistry(str(tmp_path / "reg"))
    assert reg.latest() is None and reg.versions() == []
    with pytest.raises(RegistryError, match="empty registry"):
        reg.load()
    v1 = reg.publish_dir(tiny[1])
    model = _perturbed(tiny[1], 1.5)
    v2 = reg.publish(model, {"trained_until": "5-0", "events_applied": 7})
    assert (v1, v2) == (1, 2) and reg.latest() == 2 and reg.versions() == [1, 2]
    assert (tmp_path / "reg" / "v000002" / "meta.json").is_file()
    meta = reg.meta(2)
    assert meta["parent"] == 1 and meta["events_applied"] == 7 and meta["trained_until"] == "5-0"
    hist = [np.array([1, 2, 3])]
    np.testing.assert_array_equal(reg.load(2).score(hist), model.score(hist))
    np.testing.assert_array_equal(reg.load(1).score(hist), load_model(tiny[1]).score(hist))
    # a second registry object on the same URI (a scorer) sees the same thing
    assert ModelRegistry(f"file://{tmp_path / 'reg'}").latest() == 2


def test_incomplete_version_is_invisible(tiny, tmp_path):
    reg = ModelRegistry(str(tmp_path / "reg"))
    reg.publish_dir(tiny[1])
    (tmp_path / "reg" / "v000002").mkdir()  # a crashed upload: no meta.json
    assert reg.versions() == [1]
    assert reg.publish_dir(tiny[1]) == 2  # the next publish takes the number over
    assert reg.versions() == [1, 2]


def test_rollback_pins_and_restores_exact_scores(tiny, tmp_path):
    reg = ModelRegistry(str(tmp_path / "reg"))
    reg.publish_dir(tiny[1])
    reg.publish(_perturbed(tiny[1], 2.0), {})
    hist = [np.array([4, 5]), np.array([7])]
    v1_scores = reg.load(1).score(hist)
    assert not np.array_equal(reg.load().score(hist), v1_scores)
    reg.rollback(1)
    assert reg.latest() == 1 and reg.pinned()
    np.testing.assert_array_equal(reg.load().score(hist), v1_scores)
    with pytest.raises(RegistryPinned):
        reg.publish(_perturbed(tiny[1], 3.0), {})
    with pytest.raises(RegistryError, match="cannot roll back to v9"):
        reg.rollback(9)
    reg.unpin()
    assert not reg.pinned() and reg.latest() == 1
    assert reg.publish(_perturbed(tiny[1], 3.0), {}) == 3
    assert reg.meta(3)["parent"] == 1


def test_prune_keeps_last_k_and_never_the_latest(tiny, tmp_path):
    # the count rule alone: no hourly history, only the newest offline version
    reg = ModelRegistry(str(tmp_path / "reg"), keep=2, keep_hourly_s=0, keep_offline=1)
    for _ in range(4):
        reg.publish_dir(tiny[1])
    assert reg.versions() == [3, 4]
    reg.rollback(3)
    reg.keep = 1
    assert reg.prune() == []  # v4 is the newest, v3 is what LATEST points to
    assert reg.versions() == [3, 4] and reg.latest() == 3
    reg.unpin()
    reg.publish_dir(tiny[1])
    assert reg.versions() == [5] and reg.latest() == 5


def _after_upload(monkeypatch, reg, action):
    """Run action() right after reg's next upload, before its commit (an operator acting mid-publish)."""
    original = reg._upload

    def upload(local, version):
        original(local, version)
        monkeypatch.setattr(reg, "_upload", original)
        action()

    monkeypatch.setattr(reg, "_upload", upload)


def test_a_pin_arriving_during_the_upload_wins(tiny, tmp_path, monkeypatch):
    reg = ModelRegistry(str(tmp_path / "reg"))
    reg.publish_dir(tiny[1])
    reg.publish(_perturbed(tiny[1], 2.0), {"trained_until_id": "1-0"})
    operator = ModelRegistry(reg.uri)  # e.g. `rerank model rollback` in another process
    _after_upload(monkeypatch, reg, lambda: operator.rollback(1))
    with pytest.raises(RegistryPinned, match="pinned at v1"):
        reg.publish(_perturbed(tiny[1], 3.0), {"trained_until_id": "2-0"})
    ptr = reg.pointer()
    assert (ptr.version, ptr.pinned, ptr.reason) == (1, True, "rollback")
    assert reg.versions() == [1, 2, 3] and reg.meta(3)["parent"] == 2  # uploaded, complete, unreferenced
    reg.unpin()
    assert reg.publish(_perturbed(tiny[1], 3.0), {}) == 4 and reg.meta(4)["parent"] == 1


def test_a_publish_meanwhile_is_a_conflict_unless_forced(tiny, tmp_path, monkeypatch):
    reg = ModelRegistry(str(tmp_path / "reg"))
    reg.publish_dir(tiny[1])
    other = ModelRegistry(reg.uri)
    _after_upload(monkeypatch, reg, lambda: other.publish_dir(tiny[1]))
    with pytest.raises(RegistryConflict, match="moved from v1 to v3"):
        reg.publish_dir(tiny[1])
    assert issubclass(RegistryConflict, RegistryPinned)  # callers that back off on a pin back off here too
    assert reg.latest() == 3 and reg.versions() == [1, 2, 3]
    _after_upload(monkeypatch, reg, lambda: other.rollback(1))
    assert reg.publish_dir(tiny[1], force=True) == 4
    assert reg.pointer().version == 4 and not reg.pinned()


def test_the_pointer_lock_serialises_processes_on_a_local_registry(tiny, tmp_path):
    import threading
    import time

    reg = ModelRegistry(str(tmp_path / "reg"))
    reg.publish_dir(tiny[1])
    reg.publish_dir(tiny[1])
    other = ModelRegistry(reg.uri)  # its own file descriptor: flock excludes it as it would another process
    done = threading.Event()
    with reg._pointer_lock():
        with reg._pointer_lock():  # re-entrant within a thread
            worker = threading.Thread(target=lambda: (other.rollback(1), done.set()))
            worker.start()
            time.sleep(0.3)
            assert not done.is_set() and reg.latest() == 2
    worker.join(10)
    assert done.is_set() and reg.latest() == 1 and reg.pinned()


def _online(reg, tiny, created_at: float, until: str = "1-0") -> int:
    """A version as the online trainer makes it (trained_until_id), created at a chosen time."""
    return reg.publish_dir(tiny[1], {"trained_until_id": until, "created_at": created_at})


def test_prune_keeps_one_version_per_hour_for_keep_hourly_s(tiny, tmp_path):
    import time

    hour = 3600
    t0 = (time.time() // hour) * hour  # start of this clock hour
    reg = ModelRegistry(str(tmp_path / "reg"), keep=2, keep_hourly_s=24 * hour, keep_offline=1)
    reg.publish_dir(tiny[1], {"created_at": t0 - 30 * hour})  # v1 offline baseline, old
    _online(reg, tiny, t0 - 30 * hour + 10)  # v2: beyond 24 h
    _online(reg, tiny, t0 - 5 * hour + 10)  # v3: an older one of its hour
    _online(reg, tiny, t0 - 5 * hour + 20)  # v4: the newest of that hour
    _online(reg, tiny, t0 - 2 * hour + 10)  # v5: alone in its hour
    _online(reg, tiny, t0 + 1)  # v6 \ the newest two
    _online(reg, tiny, t0 + 2)  # v7 /
    assert reg.versions() == [1, 4, 5, 6, 7]
    assert reg.prune() == []
    reg.keep_hourly_s = 3 * hour  # a shorter history: v4 (5 h ago) goes
    assert reg.prune() == [4] and reg.versions() == [1, 5, 6, 7]


def test_prune_keeps_the_newest_offline_baselines(tiny, tmp_path):
    import time

    now = time.time()
    reg = ModelRegistry(str(tmp_path / "reg"), keep=1, keep_hourly_s=0, keep_offline=1)
    assert reg.publish_dir(tiny[1]) == 1  # offline: no trained_until_id
    for k in range(3):
        _online(reg, tiny, now, until=f"{k + 1}-0")
    assert reg.versions() == [1, 4]  # the baseline survives any number of online publishes
    reg.publish(_perturbed(tiny[1], 1.1), {"note": "hand-made, not from the stream"})  # v5: offline too
    _online(reg, tiny, now)  # v6
    assert reg.versions() == [5, 6]  # only the newest baseline is kept with keep_offline=1
    reg2 = ModelRegistry(reg.uri, keep=1, keep_hourly_s=0, keep_offline=2)
    reg2.publish_dir(tiny[1])  # v7 offline
    _online(reg2, tiny, now)  # v8
    assert reg2.versions() == [5, 7, 8]


def test_prune_never_deletes_a_pinned_version_even_one_pinned_while_pruning(tiny, tmp_path, monkeypatch):
    import time

    now = time.time()
    reg = ModelRegistry(str(tmp_path / "reg"), keep=1, keep_hourly_s=0, keep_offline=1)
    reg.publish_dir(tiny[1])
    reg.keep = 10
    for _ in range(4):
        _online(reg, tiny, now)  # v2..v5
    reg.rollback(2)
    reg.keep = 1
    assert reg.prune() == [3, 4] and reg.versions() == [1, 2, 5]  # v2 pinned, v5 newest, v1 baseline
    reg.unpin()
    reg.keep = 10
    for _ in range(2):
        _online(reg, tiny, now)  # v6, v7; LATEST = v7
    reg.keep = 1
    # decided [2, 5, 6]; a rollback to v6 lands after the decision, while v2 is being deleted
    original = reg._delete_version

    def delete(version):
        if version == 2:
            reg.rollback(6)
        original(version)

    monkeypatch.setattr(reg, "_delete_version", delete)
    assert reg.prune() == [2, 5]
    assert reg.versions() == [1, 6, 7] and reg.latest() == 6 and reg.pinned()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rerank", *args], capture_output=True, text=True)


def test_model_cli_list_rollback_unpin(tiny, tmp_path):
    uri = str(tmp_path / "reg")
    out = _cli("model", "publish", "--registry", uri, "--model", str(tiny[1]), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["version"] == 1
    _cli("model", "publish", "--registry", uri, "--model", str(tiny[1]))
    listing = json.loads(_cli("model", "list", "--registry", uri, "--json").stdout)
    assert [r["version"] for r in listing["versions"]] == [1, 2] and listing["versions"][1]["latest"]
    rb = _cli("model", "rollback", "--registry", uri, "--version", "1")
    assert rb.returncode == 0 and "pinned" in rb.stdout
    assert ModelRegistry(uri).latest() == 1
    text = _cli("model", "list", "--registry", uri).stdout
    assert "pinned" in text
    bad = _cli("model", "rollback", "--registry", uri, "--version", "7")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "v7" in bad.stderr
    missing = _cli("model", "publish", "--registry", uri, "--model", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "nope" in missing.stderr
    assert _cli("model", "unpin", "--registry", uri).returncode == 0
    assert not ModelRegistry(uri).pinned()


def test_a_remote_registry_is_read_through_one_pruned_cache_per_node(tiny, tmp_path, monkeypatch):
    """mock:// is a non-local pyarrow filesystem (in this process), so reads go through the cache."""
    import uuid

    from rerank.models.registry import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-cache"))
    uri = f"mock:///reg-{uuid.uuid4().hex}"
    reg = ModelRegistry(uri, cache_keep=2)
    assert not reg.is_local
    versions = [reg.publish_dir(tiny[1]) for _ in range(4)]
    assert reg.cache_dir.parent == tmp_path / "node-cache"  # one directory per registry URI under the node's cache
    paths = [reg.local_dir(v) for v in versions]
    assert all((p / "config.json").is_file() for p in paths[-2:])
    cached = sorted(p.name for p in reg.cache_dir.iterdir())
    assert cached == ["v000003", "v000004"]  # older downloads pruned: no directory per version left behind
    assert reg.local_dir(4) == paths[-1]  # a cached version is not downloaded again
    (reg.cache_dir / ".v000009.deadbeef.partial").mkdir()  # an interrupted download, long ago
    import os
    os.utime(reg.cache_dir / ".v000009.deadbeef.partial", (0, 0))
    reg.prune_cache()
    assert not (reg.cache_dir / ".v000009.deadbeef.partial").exists()
    with pytest.raises(RegistryError, match="no complete version 7"):
        reg.local_dir(7)
    assert load_model(paths[-1]).n_items > 0  # a complete model directory


def test_resolve_model_dir_without_a_version_needs_a_model_directory(tiny, tmp_path):
    from rerank.models.registry import resolve_model_dir

    empty = str(tmp_path / "empty")
    assert resolve_model_dir(str(tiny[1]), empty) == (tiny[1], None)
    reg = ModelRegistry(str(tmp_path / "reg"))
    reg.publish_dir(tiny[1])
    assert resolve_model_dir(None, reg.uri) == (tmp_path / "reg" / "v000001", 1)  # a local registry: read in place
    with pytest.raises(RegistryError, match="no published version"):
        resolve_model_dir(None, empty)
    with pytest.raises(RegistryError, match="not a model directory"):
        resolve_model_dir(str(tmp_path), None)


def test_prune_removes_staging_copies_a_killed_publisher_left_but_not_fresh_ones(tiny, tmp_path):
    import os
    import time

    registry = ModelRegistry(str(tmp_path / "reg"))
    registry.publish_dir(tiny[1])
    stale = tmp_path / "reg" / ".v000009.deadbeef.partial"
    fresh = tmp_path / "reg" / ".v000010.cafe.partial"
    for d in (stale, fresh):
        d.mkdir()
        (d / "weights.pt").write_bytes(b"half")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    registry.prune()
    assert not stale.exists() and fresh.exists()  # a publish in progress keeps its staging copy
    assert registry.latest() == 1


def test_garbage_weights_are_a_model_load_error(tiny, tmp_path):
    import shutil

    from rerank.models.recommender import ModelLoadError

    broken = tmp_path / "broken"
    shutil.copytree(tiny[1], broken)
    for weights in broken.glob("*.pt"):
        weights.write_bytes(b"not a pickle at all")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(broken)


# ---------------------------------------------------------------- crash safety: a bad LATEST, fsync
def _three_versions(tiny, root):
    """A registry with v1..v3 (v2, v3 perturbed so their scores differ), LATEST = v3."""
    reg = ModelRegistry(str(root))
    reg.publish_dir(tiny[1])
    reg.publish(_perturbed(tiny[1], 2.0), {})
    reg.publish(_perturbed(tiny[1], 3.0), {})
    assert reg.latest() == 3
    return reg


HIST = [np.array([1, 2, 3]), np.array([7])]


@pytest.mark.parametrize("content", [b"", b'{"version": 3, "pinn', b"\x00\x00\x00\x00", b"not json", b"[3]",
                                     b'{"version": "three"}', b'{"pinned": false}', b'{"version": 0}',
                                     b'{"version": true}'],
                         ids=["empty", "truncated", "zeros", "not-json", "a-list", "bad-version", "no-version",
                              "version-0", "version-bool"])
def test_an_unreadable_latest_falls_back_to_the_newest_complete_version_read_as_pinned(tiny, tmp_path, content,
                                                                                         caplog):
    import logging

    from rerank.models.registry import UNREADABLE, resolve_model_dir

    reg = _three_versions(tiny, tmp_path / "reg")
    reg.rollback(2)  # the pin an unreadable LATEST can no longer show
    newest = reg.load(3).score(HIST)
    (tmp_path / "reg" / "LATEST").write_bytes(content)  # e.g. power lost before the data reached the disk
    scorer = ModelRegistry(reg.uri)  # a scorer / ingress starting now
    with caplog.at_level(logging.WARNING, logger="rerank.models.registry"):
        for r in (reg, scorer):
            ptr = r.pointer()
            assert (ptr.version, ptr.pinned, ptr.recovered) == (3, True, UNREADABLE)
            assert r.latest() == 3 and r.pinned()
            np.testing.assert_array_equal(r.load().score(HIST), newest)
        scorer.latest()
    warnings = [rec for rec in caplog.records if "LATEST unreadable" in rec.getMessage()]
    assert len(warnings) == 2  # once per registry object, not once per poll
    assert "v3" in warnings[0].getMessage() and "pinned" in warnings[0].getMessage()
    assert resolve_model_dir(None, reg.uri) == (tmp_path / "reg" / "v000003", 3)
    # read as pinned: publish refuses (nothing overwrites what may have been a rollback), prune deletes nothing
    with pytest.raises(RegistryPinned, match="unreadable"):
        reg.publish_dir(tiny[1])
    reg.keep, reg.keep_offline, reg.keep_hourly_s = 1, 0, 0
    assert reg.prune() == [] and reg.versions() == [1, 2, 3]
    # the next write of the pointer repairs LATEST
    reg.unpin()
    assert json.loads((tmp_path / "reg" / "LATEST").read_text())["version"] == 3
    ptr = scorer.pointer()
    assert (ptr.version, ptr.pinned, ptr.recovered) == (3, False, "")
    assert reg.publish_dir(tiny[1]) == 4 and scorer.latest() == 4


@pytest.mark.parametrize("damage", ["meta-missing", "meta-empty", "deleted", "deleted-pinned"])
def test_latest_naming_a_missing_or_incomplete_version_falls_back_to_the_newest_complete_one(tiny, tmp_path,
                                                                                            damage):
    import shutil

    from rerank.models.registry import INCOMPLETE

    reg = _three_versions(tiny, tmp_path / "reg")
    if damage == "deleted-pinned":
        reg.rollback(3)
    v2_scores = reg.load(2).score(HIST)
    v3 = tmp_path / "reg" / "v000003"
    if damage == "meta-missing":
        (v3 / "meta.json").unlink()  # an upload that never finished, or files lost in a crash
    elif damage == "meta-empty":
        (v3 / "meta.json").write_bytes(b"")  # present but unreadable: incomplete too
    else:
        shutil.rmtree(v3)
    for r in (reg, ModelRegistry(reg.uri)):  # the publisher's own object (meta cached) and a fresh one
        ptr = r.pointer()
        assert (ptr.version, ptr.recovered, ptr.named) == (2, INCOMPLETE, 3)
        assert ptr.pinned == (damage == "deleted-pinned")  # a readable pointer keeps its pin
        assert r.latest() == 2 and r.versions() == [1, 2]
        np.testing.assert_array_equal(r.load().score(HIST), v2_scores)
        with pytest.raises(RegistryError, match="no complete version 3"):
            r.meta(3)
    if damage == "deleted-pinned":  # unpin rewrites LATEST at the version read: repaired
        reg.unpin()
        ptr = ModelRegistry(reg.uri).pointer()
        assert (ptr.version, ptr.pinned, ptr.recovered, ptr.reason) == (2, False, "", "unpin")
        assert reg.publish_dir(tiny[1]) == 3
        return
    # the next publish takes a number above the one the stale pointer names, and repairs it
    assert reg.publish_dir(tiny[1]) == 4
    ptr = ModelRegistry(reg.uri).pointer()
    assert (ptr.version, ptr.recovered, reg.meta(4)["parent"]) == (4, "", 2)


def test_a_forced_publish_over_an_unreadable_latest_replaces_an_incomplete_directory_in_its_way(tiny, tmp_path):
    reg = _three_versions(tiny, tmp_path / "reg")
    (tmp_path / "reg" / "v000003" / "meta.json").write_bytes(b"")  # the crash took v3's meta...
    (tmp_path / "reg" / "LATEST").write_bytes(b"")  # ... and LATEST
    assert reg.latest() == 2 and reg.pinned()
    assert reg.publish_dir(tiny[1], force=True) == 3  # v3's number taken over: its remains moved away first
    assert reg.versions() == [1, 2, 3] and reg.meta(3)["parent"] == 2
    assert not reg.pinned() and ModelRegistry(reg.uri).pointer().recovered == ""
    assert not list((tmp_path / "reg").glob(".v000003.*"))


def test_a_local_publish_fsyncs_every_file_and_the_directory_before_latest(tiny, tmp_path, monkeypatch):
    import os
    import uuid

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the file behind each fsync")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)  # the real call, on the real file

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "reg"
    reg = ModelRegistry(str(root))
    assert reg.publish_dir(tiny[1]) == 1
    files = {p.relative_to(root / "v000001").as_posix() for p in (root / "v000001").rglob("*") if p.is_file()}
    dirs = {p.relative_to(root / "v000001").as_posix() for p in (root / "v000001").rglob("*") if p.is_dir()}
    assert "meta.json" in files and "config.json" in files
    # fsynced under its staging name, before the rename: every file, every subdirectory, itself
    staging = next(s for s in synced if os.path.basename(s).startswith(".v000001.") and s.endswith(".partial"))
    assert files | dirs <= {os.path.relpath(s, staging) for s in synced if s.startswith(staging + "/")}
    latest_tmp = [i for i, s in enumerate(synced) if os.path.basename(s).startswith(".LATEST.")]
    root_syncs = [i for i, s in enumerate(synced) if s == str(root)]
    last_version_sync = max(i for i, s in enumerate(synced) if s.startswith(staging))
    assert len(latest_tmp) == 1 and latest_tmp[0] > last_version_sync
    assert any(last_version_sync < i < latest_tmp[0] for i in root_syncs)  # the version's rename, before LATEST
    assert root_syncs[-1] > latest_tmp[0]  # and LATEST's rename
    assert json.loads((root / "LATEST").read_text())["version"] == 1
    synced.clear()
    reg.write_state("trainer_state.json", {"version": 1})  # the trainer's checkpoint: the same
    assert [os.path.basename(s).startswith(".trainer_state.json.") for s in synced] == [True, False]
    assert synced[-1] == str(root)
    synced.clear()
    remote = ModelRegistry(f"mock:///reg-{uuid.uuid4().hex}")  # an object store: one atomic PUT, nothing to fsync
    remote.publish_dir(tiny[1])
    assert synced == []

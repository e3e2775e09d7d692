"""A starting Scorer whose registry LATEST does not load serves the newest older version that does;
the core class under it (rerank.serving.models.ModelPool): scoring, arm models, polling."""

from __future__ import annotations

import pytest

from deployments.scorer import Scorer
from rerank.models.registry import ModelRegistry, RegistryError, version_name
from rerank.models.sequential import WEIGHTS_FILE

from online_helpers import tiny_model_dir, wait_until

ScorerClass = Scorer.func_or_class  # the plain class under the Serve deployment


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("scorer-fallback"))


def _registry(root, model_dir, n: int) -> ModelRegistry:
    reg = ModelRegistry(str(root / "reg"))
    for _ in range(n):
        reg.publish_dir(model_dir)
    return reg


def _corrupt(reg: ModelRegistry, version: int) -> bytes:
    """Overwrite a version's weights with garbage; returns the good bytes."""
    weights = reg.local_dir(version) / WEIGHTS_FILE
    good = weights.read_bytes()
    weights.write_bytes(b"not a torch file")
    return good


def test_a_broken_latest_falls_back_to_the_newest_loadable_version(tiny, tmp_path, caplog):
    reg = _registry(tmp_path, tiny[1], 3)
    _corrupt(reg, 3)
    (reg.local_dir(2) / WEIGHTS_FILE).unlink()  # missing weights: broken too
    with caplog.at_level("WARNING", logger="ray.serve"):
        scorer = ScorerClass(None, reg.uri, poll_s=0)
    assert scorer.current.version == "v1" and reg.latest() == 3
    assert scorer.current_version()["version"] == "v1"
    assert "LATEST v3 does not load" in caplog.text and "v2 does not load either" in caplog.text


def test_the_poll_thread_swaps_in_latest_once_it_loads(tiny, tmp_path):
    reg = _registry(tmp_path, tiny[1], 2)
    good = _corrupt(reg, 2)
    scorer = ScorerClass(None, reg.uri, poll_s=0.05)
    try:
        assert scorer.current.version == "v1"
        (reg.local_dir(2) / WEIGHTS_FILE).write_bytes(good)
        wait_until(lambda: scorer.current.version == "v2", "the scorer to swap in the repaired LATEST", 30)
    finally:
        scorer._stop.set()


def test_no_loadable_version_raises(tiny, tmp_path):
    reg = _registry(tmp_path, tiny[1], 2)
    _corrupt(reg, 1)
    _corrupt(reg, 2)
    with pytest.raises(RegistryError, match="no version loads"):
        ScorerClass(None, reg.uri, poll_s=0)


def test_a_version_newer_than_a_pinned_latest_is_never_the_fallback(tiny, tmp_path):
    reg = _registry(tmp_path, tiny[1], 3)
    reg.rollback(2)
    _corrupt(reg, 2)
    assert (tmp_path / "reg" / version_name(3)).is_dir()
    assert ScorerClass(None, reg.uri, poll_s=0).current.version == "v1"


# --- the core class under the Scorer (and the fused Ingress): rerank.serving.models.ModelPool ---------


def _inputs(n_items: int, rows: int, seed: int = 0):
    import numpy as np

    from rerank.serving.scoring import ScoreInput

    rng = np.random.default_rng(seed)
    return [ScoreInput(rng.integers(1, n_items + 1, size=6).astype(np.int32), np.zeros(6, dtype=np.int8),
                       rng.choice(np.arange(1, n_items + 1), size=10 + r, replace=False).astype(np.int32))
            for r in range(rows)]


def test_the_scorer_is_a_wrapper_of_the_model_pool(tiny, tmp_path):
    reg = _registry(tmp_path, tiny[1], 1)
    scorer = ScorerClass(None, reg.uri, poll_s=0)
    assert scorer.current is scorer.models.current and scorer.current_version() == scorer.models.current_version()
    assert scorer.current_version()["version"] == "v1" and scorer.device == "cpu"


def test_score_is_one_forward_pass_of_score_batch_and_score_calls_cut_it_back(tiny):
    import numpy as np

    from rerank.models.recommender import load_model
    from rerank.serving.models import ModelPool
    from rerank.serving.scoring import score_batch

    pool = ModelPool(str(tiny[1]), poll_s=0)
    n_items = int(pool.current.model.n_items)
    a, b = _inputs(n_items, 2, seed=1), _inputs(n_items, 3, seed=2)
    expected = score_batch(load_model(tiny[1]), a + b, 50)
    one = pool.score("", a + b)
    assert one.model_version == "dir:model" and one.batch_size == 5 and not one.degraded
    for got, want in zip(one.scores, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    first, second = pool.score_calls([("", a), ("", b)])
    assert first.batch_size == second.batch_size == 5  # one pass for both callers
    assert [len(s) for s in first.scores] == [10, 11] and [len(s) for s in second.scores] == [10, 11, 12]
    np.testing.assert_allclose(second.scores[2], expected[4], rtol=1e-5, atol=1e-6)
    pool.close()


def test_arm_models_load_once_per_key_and_the_least_recently_used_is_dropped(tiny, tmp_path, monkeypatch):
    import shutil
    import threading
    import time

    from rerank.serving import models as models_module
    from rerank.serving.models import ModelPool

    monkeypatch.setattr(models_module, "MAX_ARM_MODELS", 2)
    dirs = []
    for name in ("a", "b", "c"):
        shutil.copytree(tiny[1], tmp_path / name)
        dirs.append(f"dir:{tmp_path / name}")
    pool = ModelPool(str(tiny[1]), poll_s=0)
    loads, real_load = [], pool._load_arm

    def counted(key):
        loads.append(key)
        time.sleep(0.2)  # keeps the first load going while the other callers arrive
        return real_load(key)

    monkeypatch.setattr(pool, "_load_arm", counted)
    assert pool.peek(dirs[0]) is None  # not loaded yet: a caller on an event loop loads it off the loop
    start = threading.Barrier(4)
    got = []

    def call():
        start.wait()
        got.append(pool.model(dirs[0]))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [dirs[0]] and len({id(m) for m in got}) == 1  # one load for four callers
    assert got[0].version == "dir:a" and pool.peek(dirs[0]) is got[0]
    pool.model(dirs[1])
    pool.peek(dirs[0])  # a used again: b is now the least recently used
    pool.model(dirs[2])
    assert list(pool.arm_models) == [dirs[0], dirs[2]]
    pool.close()


def test_an_arm_model_that_fails_to_load_fails_fast_then_is_retried(tiny, tmp_path, monkeypatch):
    import shutil

    from rerank.serving import models as models_module
    from rerank.serving.models import ModelPool

    key = f"dir:{tmp_path / 'later'}"
    pool = ModelPool(str(tiny[1]), poll_s=0)
    with pytest.raises(Exception) as first:
        pool.model(key)
    shutil.copytree(tiny[1], tmp_path / "later")  # now it would load ...
    with pytest.raises(type(first.value)):
        pool.peek(key)  # ... but a recent failure answers at once
    with pytest.raises(type(first.value)):
        pool.score(key, _inputs(10, 1))
    monkeypatch.setattr(models_module, "ARM_RETRY_S", 0.0)
    assert pool.peek(key) is None and pool.model(key).version == "dir:later"
    with pytest.raises(ValueError, match="expected dir:PATH or registry:URI"):
        pool.model("s3-bucket-without-a-kind")
    pool.close()


def test_registry_arms_and_the_apps_registry_are_polled_and_swapped(tiny, tmp_path):
    from rerank.serving.models import ModelPool

    app_reg = _registry(tmp_path, tiny[1], 1)
    arm_reg = ModelRegistry(str(tmp_path / "arm-reg"))
    arm_reg.publish_dir(tiny[1])
    key = f"registry:{arm_reg.uri}"
    pool = ModelPool(None, app_reg.uri, poll_s=0.05)
    try:
        assert pool.model(key).version == "v1" and pool.current.version == "v1"
        old = pool.current
        app_reg.publish_dir(tiny[1], {"note": "second"})
        arm_reg.publish_dir(tiny[1])
        arm_reg.publish_dir(tiny[1])
        wait_until(lambda: pool.current.version == "v2", "the pool to swap in the app's v2", 30)
        wait_until(lambda: pool.peek(key).version == "v3", "the pool to swap in the arm's v3", 30)
        assert old.version == "v1"  # the swapped-out model object is left as it was (in-flight passes)
        info = pool.current_version()
        assert info["version"] == "v2" and info["meta"]["note"] == "second"
        app_reg.rollback(1)
        wait_until(lambda: pool.current.version == "v1", "the pool to follow a rollback", 30)
    finally:
        pool.close()

"""A starting Scorer whose registry LATEST does not load serves the newest older version that does."""

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

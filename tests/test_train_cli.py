"""`rerank train` and `rerank evaluate` end to end on a real slice of Amazon Beauty."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rerank.cli.main import main


@pytest.fixture(scope="module")
def beauty_slice(shared_data, tmp_path_factory):
    """The first 1500 users of Beauty.txt imported into a dataset directory."""
    root = tmp_path_factory.mktemp("beauty-slice")
    lines = (shared_data / "amazon-beauty" / "Beauty.txt").read_text().splitlines()[:1500]
    (root / "Beauty.txt").write_text("\n".join(lines) + "\n")
    assert main(["data", "import", "--format", "sasrec", str(root / "Beauty.txt"), "--out", str(root / "data")]) == 0
    return root / "data"


def run_json(capsys, argv):
    capsys.readouterr()
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_then_evaluate_and_compare(beauty_slice, tmp_path, capsys):
    data = str(beauty_slice)
    dirs = {}
    for kind, extra in (("pop", ["--set", "half_life=5"]), ("itemknn", ["--set", "neighbours=50"]),
                        ("mf", ["--epochs", "3", "--set", "factors=16"])):
        dirs[kind] = str(tmp_path / kind)
        summary = run_json(capsys, ["train", "--data", data, "--model", kind, "--out", dirs[kind], "--quiet", *extra])
        assert summary["kind"] == kind and summary["valid"]["users"] > 1000
        assert (tmp_path / kind / "train_log.jsonl").read_text().count("\n") >= 2
    assert json.loads((tmp_path / "pop" / "config.json").read_text())["half_life"] == 5
    assert json.loads((tmp_path / "mf" / "config.json").read_text())["factors"] == 16

    single = run_json(capsys, ["evaluate", "--data", data, "--model", dirs["itemknn"]])
    assert single["split"] == "test" and single["kind"] == "itemknn"
    assert set(single) >= {"hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr", "users"}
    valid = run_json(capsys, ["evaluate", "--data", data, "--model", dirs["itemknn"], "--split", "valid"])
    assert valid["ndcg@10"] != single["ndcg@10"]

    rows = run_json(capsys, ["evaluate", "--data", data, "--compare", *dirs.values(), "--plot", str(tmp_path / "c.png")])
    assert [r["kind"] for r in rows] == ["pop", "itemknn", "mf"]
    assert rows[1]["ndcg@10"] == single["ndcg@10"]
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert all(0 < r["hr@20"] < 1 for r in rows)

    capsys.readouterr()
    assert main(["evaluate", "--data", data, "--compare", *dirs.values()]) == 0
    table = capsys.readouterr().out
    assert "itemknn (itemknn)" in table and "ndcg@10" in table


def error_line(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_clear_errors(beauty_slice, tmp_path, capsys):
    data = str(beauty_slice)
    assert "not a dataset directory" in error_line(
        capsys, ["train", "--data", str(tmp_path / "none"), "--model", "pop", "--out", str(tmp_path / "m")])
    (tmp_path / "half").mkdir()
    assert "dataset.json: missing" in error_line(
        capsys, ["evaluate", "--data", str(tmp_path / "half"), "--model", str(tmp_path / "m")])
    assert "does not take option(s) epochs" in error_line(
        capsys, ["train", "--data", data, "--model", "pop", "--out", str(tmp_path / "m"), "--epochs", "3"])
    assert "expected KEY=VALUE" in error_line(
        capsys, ["train", "--data", data, "--model", "pop", "--out", str(tmp_path / "m"), "--set", "oops"])
    assert "not a model directory" in error_line(
        capsys, ["evaluate", "--data", data, "--model", str(tmp_path / "no-model")])
    (tmp_path / "empty-model").mkdir()
    assert "config.json: missing" in error_line(
        capsys, ["evaluate", "--data", data, "--model", str(tmp_path / "empty-model")])
    assert not (tmp_path / "m").exists()


def test_model_from_another_catalogue_is_refused(beauty_slice, make_dataset, tmp_path, capsys):
    other = make_dataset([[1, 2, 3, 4]] * 5, n_items=4)
    assert main(["train", "--data", str(other.path), "--model", "pop", "--out", str(tmp_path / "tiny"), "--quiet"]) == 0
    assert "different item catalogue" in error_line(
        capsys, ["evaluate", "--data", str(beauty_slice), "--model", str(tmp_path / "tiny")])


def test_console_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rerank", "evaluate", "--data", str(tmp_path), "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("rerank evaluate: error:") and "dataset.json: missing" in proc.stderr

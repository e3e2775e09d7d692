"""The dataset directory (write/load) and the leave-one-out split."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rerank.data.dataset import DatasetError, leave_one_out, load_dataset, write_dataset


def _tiny(tmp_path, sequences: dict[int, list[int]], n_items: int = 20):
    """A dataset where user u has the items `sequences[u]`, ts = position (shuffled rows)."""
    rows = [(u, item, "purchase" if i % 2 else "view", i) for u, seq in sequences.items() for i, item in enumerate(seq)]
    order = np.random.default_rng(0).permutation(len(rows))
    rows = [rows[i] for i in order]
    users = pa.table({"user_idx": list(sequences), "user_id": [f"u{u}" for u in sequences]})
    items = pa.table(
        {
            "item_idx": list(range(1, n_items + 1)),
            "item_id": [f"i{i}" for i in range(1, n_items + 1)],
            "attributes": pa.array([[i % 3 + 1] for i in range(1, n_items + 1)], type=pa.list_(pa.int32())),
        }
    )
    events = pa.table(
        {
            "user_idx": [r[0] for r in rows],
            "item_idx": [r[1] for r in rows],
            "event_type": [r[2] for r in rows],
            "ts": [r[3] for r in rows],
        }
    )
    return load_dataset(write_dataset(tmp_path / "ds", users, items, events, "tiny", "test", False))


def test_write_sorts_events_by_user_then_time_and_load_checks_counts(tmp_path):
    ds = _tiny(tmp_path, {1: [5, 6, 7, 8], 2: [9, 3], 3: [1, 2, 3, 4, 10]})
    assert [list(s) for s in ds.sequences] == [[], [5, 6, 7, 8], [9, 3], [1, 2, 3, 4, 10]]
    assert list(ds.event_type_sequences[1]) == [1, 4, 1, 4]  # view, purchase, ...
    meta = json.loads((ds.path / "dataset.json").read_text())
    assert meta["n_users"] == 3 and meta["n_items"] == 20 and meta["n_events"] == 11
    assert meta["n_attributes"] == 3 and meta["event_types"] == ["purchase", "view"]
    assert ds.item_ids[5] == "i5" and ds.user_ids[2] == "u2"


def test_ties_in_time_keep_the_source_order(tmp_path):
    users = pa.table({"user_idx": [1], "user_id": ["a"]})
    items = pa.table({"item_idx": [1, 2, 3], "item_id": ["x", "y", "z"], "attributes": pa.array([[], [], []], type=pa.list_(pa.int32()))})
    events = pa.table({"user_idx": [1, 1, 1], "item_idx": [3, 1, 2], "event_type": ["view"] * 3, "ts": [100, 100, 50]})
    ds = load_dataset(write_dataset(tmp_path / "ds", users, items, events, "t", "test", True))
    assert list(ds.sequences[1]) == [2, 3, 1]


def test_load_names_the_missing_file(tmp_path):
    ds = _tiny(tmp_path, {1: [1, 2, 3]})
    (ds.path / "items.parquet").unlink()
    with pytest.raises(DatasetError, match="items.parquet: missing"):
        load_dataset(ds.path)
    with pytest.raises(DatasetError, match="not a dataset directory"):
        load_dataset(tmp_path / "nowhere")


def test_load_rejects_a_wrong_schema(tmp_path):
    ds = _tiny(tmp_path, {1: [1, 2, 3]})
    pq.write_table(pa.table({"user_idx": pa.array([1], pa.int64()), "user_id": ["u1"]}), ds.path / "users.parquet")
    with pytest.raises(DatasetError, match="users.parquet: schema"):
        load_dataset(ds.path)


def test_leave_one_out_targets_are_the_last_two_items(tmp_path):
    seqs = {1: [5, 6, 7, 8], 2: [9, 3], 3: [1, 2, 3, 4, 10], 4: [11, 12, 13]}
    ds = _tiny(tmp_path, seqs)
    split = leave_one_out(ds)
    assert list(split.users) == [1, 3, 4]  # user 2 is too short to evaluate
    for u in (1, 3, 4):
        assert split.valid_target[u] == seqs[u][-2] and split.test_target[u] == seqs[u][-1]
        assert list(split.train[u]) == seqs[u][:-2]
    assert split.valid_target[2] == 0 and split.test_target[2] == 0
    assert list(split.train[2]) == [9, 3]  # short users are all training data
    hist, types, targets = split.inputs(ds, "test")
    assert [list(h) for h in hist] == [seqs[u][:-1] for u in (1, 3, 4)]
    assert list(targets) == [8, 10, 13]
    assert [len(t) for t in types] == [len(h) for h in hist]
    hist, _, targets = split.inputs(ds, "valid")
    assert [list(h) for h in hist] == [seqs[u][:-2] for u in (1, 3, 4)]
    assert list(targets) == [7, 4, 12]


def _beauty(shared_data, tmp_path, n_lines: int = 400):
    from rerank.data.importers import import_sasrec

    src = tmp_path / "beauty.txt"
    with (shared_data / "amazon-beauty" / "Beauty.txt").open() as f:
        src.write_text("".join(next(f) for _ in range(n_lines)))
    return load_dataset(import_sasrec(src, tmp_path / "beauty").out), src


def test_leave_one_out_has_no_leakage_on_real_sequences(shared_data, tmp_path):
    ds, src = _beauty(shared_data, tmp_path)
    split = leave_one_out(ds)
    source = {line.split()[0]: line.split()[1:] for line in src.read_text().splitlines()}
    assert len(split.users) == sum(len(v) >= 3 for v in source.values())
    for u in split.users:
        items = [ds.item_ids[i] for i in ds.sequences[u]]
        assert items == source[ds.user_ids[u]]
        # training input stops before the validation target; the test target's position is never in it
        assert len(split.train[u]) == len(items) - 2
        assert split.test_target[u] == ds.sequences[u][-1] and split.valid_target[u] == ds.sequences[u][-2]
        if len(set(items)) == len(items):  # without repeats the target item itself cannot appear
            assert split.test_target[u] not in split.train[u]
            assert split.valid_target[u] not in split.train[u]
    hist, _, targets = split.inputs(ds, "test")
    assert all(t not in h[:-1] or list(ds.sequences[u]).count(t) > 1 for u, h, t in zip(split.users, hist, targets))
    assert all(h[-1] == split.valid_target[u] for u, h in zip(split.users, hist))


def test_write_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path):
    ds = _tiny(tmp_path, {1: [1, 2, 3]})
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a dataset directory; refusing"):
        write_dataset(precious, ds.users, ds.items, ds.events, "x", "test", False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_rewrite_replaces_the_previous_version_and_leaves_no_temporaries(tmp_path):
    ds = _tiny(tmp_path, {1: [1, 2, 3]})
    events = ds.events.slice(0, 2)
    again = load_dataset(write_dataset(ds.path, ds.users, ds.items, events, "tiny", "test", False))
    assert list(again.sequences[1]) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

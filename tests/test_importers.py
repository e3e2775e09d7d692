"""Importers on small real slices, round trips, and every bad-input case through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rerank.cli.main import main
from rerank.data.dataset import load_dataset
from rerank.data.importers import import_events, import_recbole, import_sasrec


def _head(src: Path, dst: Path, n_lines: int) -> Path:
    with src.open() as f:
        dst.write_text("".join(line for _, line in zip(range(n_lines), f)))
    return dst


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- sasrec


def test_sasrec_slice_round_trips_sequences_and_attributes(shared_data, tmp_path, capsys):
    beauty = shared_data / "amazon-beauty"
    src = _head(beauty / "Beauty.txt", tmp_path / "beauty.txt", 300)
    attrs_file = beauty / "Beauty_item2attributes.json"
    rc, out, _ = _cli(capsys, "data", "import", "--format", "sasrec", src, "--item-attributes", attrs_file, "--out", tmp_path / "ds", "--json")
    assert rc == 0
    summary = json.loads(out)
    ds = load_dataset(tmp_path / "ds")
    source = [line.split() for line in src.read_text().splitlines()]
    assert summary["n_users"] == ds.n_users == 300
    assert summary["n_events"] == sum(len(t) - 1 for t in source)
    assert summary["ignored_items"] == 12101 - ds.n_items  # attribute file covers the whole catalogue
    for tokens in source:
        u = int(np.flatnonzero(ds.user_ids == tokens[0])[0])
        assert list(ds.item_ids[ds.sequences[u]]) == tokens[1:]
        assert list(ds.timestamp_sequences[u]) == list(range(len(tokens) - 1))  # ts = position
    assert set(ds.events["event_type"].to_pylist()) == {"purchase"}
    # integer ids keep numeric order
    ids = [int(i) for i in ds.item_ids[1:]]
    assert ids == sorted(ids)
    # attributes: the same grouping as the source, re-numbered densely 1..n
    raw = json.loads(attrs_file.read_text())
    mapping: dict[int, int] = {}
    for idx, item_id in enumerate(ds.item_ids[1:], start=1):
        dense = [a for a in ds.item_attributes[idx] if a]
        expected = list(dict.fromkeys(raw[item_id]))  # the source repeats some ids within an item
        assert len(dense) == len(expected)
        for orig, new in zip(expected, dense):
            assert mapping.setdefault(orig, new) == new
    assert sorted(mapping.values()) == list(range(1, ds.n_attributes + 1))
    assert sorted(mapping, key=mapping.get) == sorted(mapping)  # numeric order kept


def test_full_beauty_keeps_the_original_item_ids_as_idx(shared_data, tmp_path):
    beauty = shared_data / "amazon-beauty"
    summary = import_sasrec(beauty / "Beauty.txt", tmp_path / "ds", beauty / "Beauty_item2attributes.json")
    assert (summary.n_users, summary.n_items, summary.n_events, summary.n_attributes) == (22363, 12101, 198502, 637)
    ds = load_dataset(summary.out)
    assert all(int(ds.item_ids[i]) == i for i in range(1, ds.n_items + 1))
    assert list(ds.item_attributes[4][:3]) == [1, 2, 3]  # {"4": [1, 2, 3]} in the source


# --------------------------------------------------------------------------- recbole


def test_recbole_slice_orders_by_time_and_reads_item_attributes(shared_data, tmp_path):
    ml = shared_data / "ml-100k"
    src = _head(ml / "ml-100k.inter", tmp_path / "slice.inter", 2001)
    summary = import_recbole(src, tmp_path / "ds", items=ml / "ml-100k.item")
    ds = load_dataset(summary.out)
    assert ds.has_timestamps and summary.n_events == 2000
    assert summary.attribute_columns == ["release_year", "class"]  # titles identify items: not attributes
    rows = [line.split("\t") for line in src.read_text().splitlines()[1:]]
    by_user: dict[str, list[tuple[int, int, str]]] = {}
    for pos, (user, item, _rating, ts) in enumerate(rows):
        by_user.setdefault(user, []).append((int(float(ts)), pos, item))
    assert ds.n_users == len(by_user)
    for user, events in by_user.items():
        u = int(np.flatnonzero(ds.user_ids == user)[0])
        events.sort()  # by time, ties in file order
        assert list(ds.item_ids[ds.sequences[u]]) == [e[2] for e in events]
        assert list(ds.timestamp_sequences[u]) == [e[0] for e in events]
    # item "1" is Toy Story (1995), Animation Children's Comedy; titles are not attributes
    item_rows = {line.split("\t")[0]: line.split("\t") for line in (ml / "ml-100k.item").read_text().splitlines()[1:]}
    attr_sets = {}
    for idx in range(1, ds.n_items + 1):
        attr_sets[ds.item_ids[idx]] = {a for a in ds.item_attributes[idx] if a}
    for item_id, attrs in attr_sets.items():
        _, _, year, genres = item_rows[item_id]
        assert len(attrs) == len(genres.split()) + (1 if year.strip() else 0)
    same_genre = [i for i, r in item_rows.items() if i in attr_sets and "Animation" in r[3].split()]
    if len(same_genre) >= 2:  # a shared genre is a shared attribute id
        assert set.intersection(*(attr_sets[i] for i in same_genre))


def test_recbole_without_timestamp_keeps_file_order(tmp_path):
    src = tmp_path / "x.inter"
    src.write_text("user_id:token\titem_id:token\nb\tq\na\tp\nb\tp\n")
    summary = import_recbole(src, tmp_path / "ds")
    ds = load_dataset(summary.out)
    assert not ds.has_timestamps
    assert list(ds.item_ids[ds.sequences[2]]) == ["q", "p"] and list(ds.user_ids[1:]) == ["a", "b"]


# --------------------------------------------------------------------------- events


def test_events_csv_with_unix_and_iso_timestamps(tmp_path, capsys):
    src = tmp_path / "log.csv"
    src.write_text(
        "timestamp,user_id,item_id,event_type,extra\n"
        "1700000100,alice,sku-9,view,x\n"
        "2023-11-14T22:13:30Z,alice,sku-2,cart,x\n"  # 1700000010
        "1700000050.7,bob,sku-9,purchase,x\n"
        "2023-11-14T22:13:20,alice,sku-10,click,x\n"  # naive = UTC: 1700000000
    )
    rc, out, _ = _cli(capsys, "data", "import", "--format", "events", src, "--out", tmp_path / "ds")
    assert rc == 0 and "2 users, 3 items, 4 events" in out
    ds = load_dataset(tmp_path / "ds")
    assert ds.has_timestamps and ds.meta["source_format"] == "events"
    alice = int(np.flatnonzero(ds.user_ids == "alice")[0])
    assert list(ds.item_ids[ds.sequences[alice]]) == ["sku-10", "sku-2", "sku-9"]
    assert list(ds.timestamp_sequences[alice]) == [1700000000, 1700000010, 1700000100]
    assert list(ds.event_type_sequences[alice]) == [2, 3, 1]
    bob = int(np.flatnonzero(ds.user_ids == "bob")[0])
    assert list(ds.timestamp_sequences[bob]) == [1700000050]


def test_events_parquet_with_integer_ids_and_timestamp_type(tmp_path):
    src = tmp_path / "log.parquet"
    table = pa.table(
        {
            "user_id": pa.array([10, 2, 10], pa.int64()),
            "item_id": pa.array([7, 7, 30], pa.int64()),
            "event_type": ["view", "click", "purchase"],
            "timestamp": pa.array([3_000, 1_000, 2_000], pa.timestamp("ms")).cast(pa.timestamp("s")),
        }
    )
    pq.write_table(table, src)
    ds = load_dataset(import_events(src, tmp_path / "ds").out)
    assert list(ds.user_ids[1:]) == ["2", "10"] and list(ds.item_ids[1:]) == ["7", "30"]  # numeric order
    assert list(ds.item_ids[ds.sequences[2]]) == ["30", "7"]
    assert list(ds.timestamp_sequences[2]) == [2, 3]


def test_synth_stream_round_trips_through_the_events_importer(tmp_path):
    import pyarrow.csv as pacsv

    from rerank.data.synth import SynthConfig, generate_shop

    shop = generate_shop(SynthConfig(n_users=60, n_items=80, seed=3))
    ev = shop.events
    table = pa.table(
        {
            "user_id": pa.array(shop.users["user_id"].to_numpy(zero_copy_only=False)[ev["user_idx"].to_numpy() - 1]),
            "item_id": pa.array(shop.items["item_id"].to_numpy(zero_copy_only=False)[ev["item_idx"].to_numpy() - 1]),
            "event_type": ev["event_type"],
            "timestamp": ev["ts"],
        }
    )
    pacsv.write_csv(table, tmp_path / "stream.csv")
    ds = load_dataset(import_events(tmp_path / "stream.csv", tmp_path / "ds").out)
    seen_items = np.unique(ev["item_idx"].to_numpy())
    for u in range(1, 61):
        mine = ev.filter(pc.equal(ev["user_idx"], u))
        assert list(ds.item_ids[ds.sequences[u]]) == [shop.items["item_id"][i - 1].as_py() for i in mine["item_idx"].to_pylist()]
        assert ds.event_type_sequences[u].tolist() == [
            {"view": 1, "click": 2, "cart": 3, "purchase": 4}[t] for t in mine["event_type"].to_pylist()
        ]
    assert ds.n_items == len(seen_items)


# --------------------------------------------------------------------------- bad input


BAD_SASREC = [
    ("empty file", "", None, "empty file"),
    ("user without items", "1 5 6\n2\n", None, "line 2: expected `user_id item_id"),
    ("duplicate user", "1 5 6\n1 7\n", None, "line 2: user '1' already has a sequence on line 1"),
    ("attribute ids not integers", "1 5 6\n", '{"5": [1, "brand"]}', "item '5': expected a list of integer attribute ids"),
    ("attributes not JSON", "1 5 6\n", '{"5": [1,\n 2', "line 2: invalid JSON"),
    ("attributes not an object", "1 5 6\n", "[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize("case,sequences,attributes,message", BAD_SASREC, ids=[c[0] for c in BAD_SASREC])
def test_bad_sasrec_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, case, sequences, attributes, message):
    src = tmp_path / "seq.txt"
    src.write_text(sequences)
    argv = ["data", "import", "--format", "sasrec", src, "--out", tmp_path / "out" / "ds"]
    bad_file = src
    if attributes is not None:
        bad_file = tmp_path / "attrs.json"
        bad_file.write_text(attributes)
        argv += ["--item-attributes", bad_file]
    rc, out, err = _cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and str(bad_file) in err and message in err, err
    assert not (tmp_path / "out").exists()


BAD_RECBOLE = [
    ("header only", "user_id:token\titem_id:token\ttimestamp:float\n", "no interactions after the header"),
    ("untyped header", "user_id\titem_id\n1\t2\n", "line 1: header field 'user_id' is not `name:type`"),
    ("missing item column", "user_id:token\trating:float\n1\t2\n", "line 1: missing column `item_id:token`"),
    ("text timestamp", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t3\tyesterday\n", "line 3: column timestamp: expected a number"),
    ("short line", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\n", "line 2: expected 3 tab-separated fields"),
    ("empty id", "user_id:token\titem_id:token\n1\t\n", "line 2: column item_id: expected an id"),
]


@pytest.mark.parametrize("case,inter,message", BAD_RECBOLE, ids=[c[0] for c in BAD_RECBOLE])
def test_bad_recbole_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, case, inter, message):
    src = tmp_path / "x.inter"
    src.write_text(inter)
    rc, out, err = _cli(capsys, "data", "import", "--format", "recbole", src, "--out", tmp_path / "out" / "ds")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and str(src) in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_bad_recbole_item_file_is_named(tmp_path, capsys):
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\n1\t2\n")
    items = tmp_path / "x.item"
    items.write_text("movie_title:token_seq\tclass:token_seq\nToy Story\tAnimation\n")
    rc, _, err = _cli(capsys, "data", "import", "--format", "recbole", inter, "--items", items, "--out", tmp_path / "out" / "ds")
    assert rc == 2 and str(items) in err and "line 1: missing column `item_id:token`" in err
    assert not (tmp_path / "out").exists()


HEADER = "user_id,item_id,event_type,timestamp\n"
BAD_EVENTS = [
    ("header only", HEADER, "no events after the header"),
    ("missing column", "user_id,item_id,timestamp\n1,2,3\n", "line 1: missing column(s) event_type"),
    ("unknown event type", HEADER + "1,2,view,5\n1,3,wishlist,6\n", "line 3: column event_type: expected one of view|click|cart|purchase, got 'wishlist'"),
    ("text timestamp", HEADER + "1,2,view,5\n1,3,click,soon\n", "line 3: column timestamp: expected Unix seconds or an ISO-8601 time, got 'soon'"),
    ("missing timestamp", HEADER + "1,2,view,\n", "line 2: column timestamp"),
    ("empty user", HEADER + "1,2,view,5\n,3,click,6\n", "line 3: column user_id: expected an id"),
]


@pytest.mark.parametrize("case,csv,message", BAD_EVENTS, ids=[c[0] for c in BAD_EVENTS])
def test_bad_event_log_is_one_clear_line_and_writes_nothing(tmp_path, capsys, case, csv, message):
    src = tmp_path / "log.csv"
    src.write_text(csv)
    rc, out, err = _cli(capsys, "data", "import", "--format", "events", src, "--out", tmp_path / "out" / "ds")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and str(src) in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_bad_parquet_event_log_names_the_column(tmp_path, capsys):
    src = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["a"], "item_id": ["b"], "event_type": ["like"], "timestamp": [1]}), src)
    rc, _, err = _cli(capsys, "data", "import", "--format", "events", src, "--out", tmp_path / "out" / "ds")
    assert rc == 2 and str(src) in err and "row 0: column event_type" in err and "'like'" in err
    pq.write_table(pa.table({"user_id": ["a"], "item_id": ["b"], "timestamp": [1]}), src)
    rc, _, err = _cli(capsys, "data", "import", "--format", "events", src, "--out", tmp_path / "out" / "ds")
    assert rc == 2 and "missing column(s) event_type" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["sasrec", "recbole", "events"])
def test_missing_source_file_is_named(tmp_path, capsys, fmt):
    src = tmp_path / "nope.csv"
    rc, _, err = _cli(capsys, "data", "import", "--format", fmt, src, "--out", tmp_path / "out" / "ds")
    assert rc == 2 and f"{src}:" in err and "not found" in err
    assert not (tmp_path / "out").exists()


def test_events_need_a_csv_or_parquet_file(tmp_path, capsys):
    src = tmp_path / "log.json"
    src.write_text("{}")
    rc, _, err = _cli(capsys, "data", "import", "--format", "events", src, "--out", tmp_path / "ds")
    assert rc == 2 and "expected a .csv or .parquet event log" in err


def test_options_of_another_format_are_refused(tmp_path, capsys):
    src = tmp_path / "seq.txt"
    src.write_text("1 2 3\n")
    rc, _, err = _cli(capsys, "data", "import", "--format", "sasrec", src, "--items", src, "--out", tmp_path / "ds")
    assert rc == 2 and "--items applies to --format recbole only" in err


def test_failed_reimport_keeps_the_previous_dataset(tmp_path, capsys):
    good = tmp_path / "seq.txt"
    good.write_text("1 2 3 4\n")
    assert _cli(capsys, "data", "import", "--format", "sasrec", good, "--out", tmp_path / "ds")[0] == 0
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\n1 3\n")
    assert _cli(capsys, "data", "import", "--format", "sasrec", bad, "--out", tmp_path / "ds")[0] == 2
    assert list(load_dataset(tmp_path / "ds").sequences[1]) == [1, 2, 3]


def test_csv_row_with_missing_fields_names_its_line(tmp_path, capsys):
    src = tmp_path / "log.csv"
    src.write_text(HEADER + "1,2,view,5\n1,3,click\n")
    rc, _, err = _cli(capsys, "data", "import", "--format", "events", src, "--out", tmp_path / "out" / "ds")
    assert rc == 2 and f"{src}: line 3: expected 4 comma-separated fields, got 3" in err
    assert not (tmp_path / "out").exists()


def test_csv_with_byte_order_mark_and_parquet_millisecond_times(tmp_path):
    src = tmp_path / "log.csv"
    src.write_bytes(b"\xef\xbb\xbf" + (HEADER + "1,2,view,5\n").encode())
    assert import_events(src, tmp_path / "a").n_events == 1
    pq_src = tmp_path / "log.parquet"
    times = pa.array([1_700_000_000_999, 1_700_000_001_500], pa.timestamp("ms", tz="UTC"))
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": ["a", "b"], "event_type": ["view", "cart"], "timestamp": times}), pq_src)
    ds = load_dataset(import_events(pq_src, tmp_path / "b").out)
    assert list(ds.timestamp_sequences[1]) == [1_700_000_000, 1_700_000_001]


def test_import_refuses_to_overwrite_a_folder_that_is_not_a_dataset(tmp_path, capsys):
    src = tmp_path / "seq.txt"
    src.write_text("1 2 3\n")
    rc, _, err = _cli(capsys, "data", "import", "--format", "sasrec", src, "--out", tmp_path)
    assert rc == 2 and "refusing to replace it" in err and src.exists()


def test_line_numbers_count_blank_lines_and_bad_encoding_is_named(tmp_path, capsys):
    src = tmp_path / "x.inter"
    src.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n\n1\t3\tlater\n")
    rc, _, err = _cli(capsys, "data", "import", "--format", "recbole", src, "--out", tmp_path / "ds")
    assert rc == 2 and f"{src}: line 4: column timestamp" in err
    seq = tmp_path / "seq.txt"
    seq.write_bytes(b"1 2 3\n2 4 \xff\n")
    rc, _, err = _cli(capsys, "data", "import", "--format", "sasrec", seq, "--out", tmp_path / "ds")
    assert rc == 2 and f"{seq}: line 2: not UTF-8 text" in err
    assert not (tmp_path / "ds").exists()

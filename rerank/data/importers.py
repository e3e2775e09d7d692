"""Importers: turn public dataset files and shop event logs into a dataset directory.

Three source formats, each validated completely before anything is written:

* ``sasrec``  -- ``user item item ...`` lines in time order (Amazon Beauty from S3-Rec),
  with an optional ``{"item": [attribute ids]}`` JSON file.
* ``recbole`` -- an atomic ``.inter`` file (tab-separated, typed header such as
  ``user_id:token item_id:token rating:float timestamp:float``) and an optional ``.item`` file.
* ``events``  -- a shop's own log, CSV or Parquet with columns
  ``user_id, item_id, event_type, timestamp`` (Unix seconds or ISO-8601).

Bad input raises `DataImportError` with one line naming the file, the line (text files)
or column, and what was expected.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rerank.data.dataset import EVENT_TYPES, write_dataset


class DataImportError(ValueError):
    """A source file that cannot be imported; the message is one line naming where and why."""


@dataclass
class ImportSummary:
    """What an importer wrote: counts for the one-line report of `rerank data import`."""

    out: Path
    source_format: str
    n_users: int
    n_items: int
    n_attributes: int
    n_events: int
    has_timestamps: bool
    ignored_items: int = 0  # items of a side file (attributes / .item) that never occur in events
    attribute_columns: list[str] = field(default_factory=list)  # recbole: .item columns used as attributes

    def as_dict(self) -> dict:
        return {**self.__dict__, "out": str(self.out)}


# --------------------------------------------------------------------------- helpers


def _check_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataImportError(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise DataImportError(f"{path}: empty file, expected {what}")
    return path


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a decoding error names the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataImportError(f"{path}: line {line}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _dense_ids(ids: Iterable[str]) -> list[str]:
    """Distinct ids in index order: numeric order when every id is an integer, else sorted text."""
    unique = set(ids)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def _index_of(ordered: list[str]) -> dict[str, int]:
    return {key: i + 1 for i, key in enumerate(ordered)}  # 0 = padding


def _users_table(user_ids: list[str]) -> pa.Table:
    return pa.table({"user_idx": np.arange(1, len(user_ids) + 1, dtype=np.int32), "user_id": user_ids})


def _items_table(item_ids: list[str], attributes: dict[str, list[int]]) -> pa.Table:
    return pa.table(
        {
            "item_idx": np.arange(1, len(item_ids) + 1, dtype=np.int32),
            "item_id": item_ids,
            "attributes": pa.array([attributes.get(i, []) for i in item_ids], type=pa.list_(pa.int32())),
        }
    )


def _events_table(user_idx: np.ndarray, item_idx: np.ndarray, event_type: Sequence[str] | pa.Array, ts: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "user_idx": np.asarray(user_idx, dtype=np.int32),
            "item_idx": np.asarray(item_idx, dtype=np.int32),
            "event_type": pa.array(event_type, type=pa.string()),
            "ts": np.asarray(ts, dtype=np.int64),
        }
    )


def _write(out, users, items, events, name, fmt, has_ts, ignored_items=0, attribute_columns=()) -> ImportSummary:
    path = write_dataset(out, users, items, events, name=name, source_format=fmt, has_timestamps=has_ts)
    meta = json.loads((path / "dataset.json").read_text())
    return ImportSummary(
        out=path,
        source_format=fmt,
        n_users=meta["n_users"],
        n_items=meta["n_items"],
        n_attributes=meta["n_attributes"],
        n_events=meta["n_events"],
        has_timestamps=has_ts,
        ignored_items=ignored_items,
        attribute_columns=list(attribute_columns),
    )


# --------------------------------------------------------------------------- sasrec


def read_item_attributes(path: Path) -> dict[str, list[int]]:
    """`{"item": [attribute id, ...]}` -> item id -> original integer attribute ids."""
    _check_file(path, "item attributes JSON")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataImportError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise DataImportError(f"{path}: expected a JSON object {{\"item_id\": [attribute ids]}}, got {type(raw).__name__}")
    out: dict[str, list[int]] = {}
    for item, attrs in raw.items():
        if not isinstance(attrs, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in attrs):
            raise DataImportError(f"{path}: item {item!r}: expected a list of integer attribute ids, got {attrs!r:.80}")
        out[str(item)] = attrs
    return out


def _densify_attributes(per_item: dict[str, list]) -> dict[str, list[int]]:
    """Map attribute values to dense ids 1..n (numeric order for integers); keep per-item order."""
    dense = _index_of(_dense_ids(str(a) for attrs in per_item.values() for a in attrs))
    return {item: list(dict.fromkeys(dense[str(a)] for a in attrs)) for item, attrs in per_item.items()}


def import_sasrec(sequences: str | os.PathLike, out: str | os.PathLike, item_attributes: str | os.PathLike | None = None) -> ImportSummary:
    """Import `user item item ...` lines (time order, no timestamps: ts = position)."""
    path = _check_file(Path(sequences), "sequence file")
    users: list[str] = []
    seqs: list[list[str]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(_read_lines(path), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < 2:
            raise DataImportError(f"{path}: line {lineno}: expected `user_id item_id [item_id ...]`, got {line.strip()!r}")
        if tokens[0] in seen:
            raise DataImportError(f"{path}: line {lineno}: user {tokens[0]!r} already has a sequence on line {seen[tokens[0]]}")
        seen[tokens[0]] = lineno
        users.append(tokens[0])
        seqs.append(tokens[1:])
    if not users:
        raise DataImportError(f"{path}: no sequences found, expected `user_id item_id [item_id ...]` lines")
    attrs = read_item_attributes(Path(item_attributes)) if item_attributes is not None else {}

    user_ids = _dense_ids(users)
    item_ids = _dense_ids(i for s in seqs for i in s)
    uidx, iidx = _index_of(user_ids), _index_of(item_ids)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    user_col = np.repeat(np.fromiter((uidx[u] for u in users), dtype=np.int32, count=len(users)), lengths)
    item_col = np.fromiter((iidx[i] for s in seqs for i in s), dtype=np.int32, count=int(lengths.sum()))
    ts = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    known = set(iidx)
    ignored = sum(1 for item in attrs if item not in known)
    dense_attrs = _densify_attributes({k: v for k, v in attrs.items() if k in known})
    events = _events_table(user_col, item_col, ["purchase"] * len(item_col), ts)
    return _write(out, _users_table(user_ids), _items_table(item_ids, dense_attrs), events, path.stem, "sasrec", False, ignored)


# --------------------------------------------------------------------------- recbole


def _read_recbole(path: Path, what: str) -> tuple[dict[str, str], dict[str, list[str]], list[int]]:
    """Read a RecBole atomic file: ({field: type}, {field: values as text}, line number of each row)."""
    _check_file(path, what)
    text = _read_lines(path)
    header = text[0].split("\t")
    types: dict[str, str] = {}
    for col in header:
        name, sep, kind = col.partition(":")
        if not sep or not name or kind not in ("token", "token_seq", "float", "float_seq"):
            raise DataImportError(f"{path}: line 1: header field {col!r} is not `name:type` with type token|token_seq|float|float_seq")
        if name in types:
            raise DataImportError(f"{path}: line 1: column {name!r} appears twice")
        types[name] = kind
    columns: dict[str, list[str]] = {name: [] for name in types}
    lines: list[int] = []
    for lineno, line in enumerate(text[1:], start=2):
        if not line:
            continue
        values = line.split("\t")
        if len(values) != len(types):
            raise DataImportError(f"{path}: line {lineno}: expected {len(types)} tab-separated fields ({', '.join(header)}), got {len(values)}")
        for name, value in zip(types, values):
            columns[name].append(value)
        lines.append(lineno)
    return types, columns, lines


def _require(path: Path, types: dict[str, str], name: str, kind: str) -> None:
    if name not in types:
        raise DataImportError(f"{path}: line 1: missing column `{name}:{kind}` (header has {', '.join(types)})")


def _recbole_item_attributes(path: Path, max_distinct_share: float = 0.5) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """token / token_seq columns of a `.item` file -> item id -> [(column, value)], and the columns used.

    A column with more distinct values than `max_distinct_share` of the items (titles, free
    text, ids) identifies items rather than describing them, so it is not an attribute.
    """
    types, columns, _ = _read_recbole(path, "RecBole .item file")
    _require(path, types, "item_id", "token")
    item_col = columns["item_id"]
    n = max(len(item_col), 1)
    used: list[str] = []
    per_item: dict[str, list[tuple[str, str]]] = {item: [] for item in item_col}
    for name, kind in types.items():
        if name == "item_id" or kind not in ("token", "token_seq"):
            continue
        split = [v.split() if kind == "token_seq" else ([v] if v.strip() else []) for v in columns[name]]
        if len({t for toks in split for t in toks}) > max_distinct_share * n:
            continue
        used.append(name)
        for item, toks in zip(item_col, split):
            per_item[item].extend((name, t) for t in toks)
    return per_item, used


def import_recbole(inter: str | os.PathLike, out: str | os.PathLike, items: str | os.PathLike | None = None) -> ImportSummary:
    """Import a RecBole `.inter` file (ts = int(timestamp)) and optional `.item` attributes."""
    path = Path(inter)
    types, columns, lines = _read_recbole(path, "RecBole .inter file")
    _require(path, types, "user_id", "token")
    _require(path, types, "item_id", "token")
    n = len(columns["user_id"])
    if n == 0:
        raise DataImportError(f"{path}: no interactions after the header line")
    has_ts = "timestamp" in types
    if has_ts:
        ts = np.empty(n, dtype=np.int64)
        for row, value in enumerate(columns["timestamp"]):
            try:
                number = float(value)
                if not math.isfinite(number):
                    raise ValueError
            except ValueError:
                raise DataImportError(f"{path}: line {lines[row]}: column timestamp: expected a number (Unix seconds), got {value!r}") from None
            ts[row] = int(number)
    else:
        ts = np.arange(n, dtype=np.int64)  # file order; write_dataset keeps it per user
    for name in ("user_id", "item_id"):
        for row, value in enumerate(columns[name]):
            if not value.strip():
                raise DataImportError(f"{path}: line {lines[row]}: column {name}: expected an id, got an empty value")

    per_item: dict[str, list[tuple[str, str]]] = {}
    used: list[str] = []
    if items is not None:
        per_item, used = _recbole_item_attributes(Path(items))
    user_ids = _dense_ids(columns["user_id"])
    item_ids = _dense_ids(columns["item_id"])
    uidx, iidx = _index_of(user_ids), _index_of(item_ids)
    known = set(iidx)
    ignored = sum(1 for item in per_item if item not in known)
    pairs = {item: [f"{c}={v}" for c, v in attrs] for item, attrs in per_item.items() if item in known}
    dense_attrs = _densify_attributes(pairs)
    events = _events_table(
        np.fromiter((uidx[u] for u in columns["user_id"]), dtype=np.int32, count=n),
        np.fromiter((iidx[i] for i in columns["item_id"]), dtype=np.int32, count=n),
        ["purchase"] * n,
        ts,
    )
    return _write(out, _users_table(user_ids), _items_table(item_ids, dense_attrs), events, path.stem, "recbole", has_ts, ignored, used)


# --------------------------------------------------------------------------- events (shop log)

EVENT_COLUMNS = ("user_id", "item_id", "event_type", "timestamp")


def _read_events_table(path: Path) -> tuple[pa.Table, bool]:
    """Read a CSV or Parquet event log -> (table with the event columns, is_text_file)."""
    _check_file(path, "event log (CSV or Parquet)")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except pa.ArrowInvalid as err:
            raise DataImportError(f"{path}: not a readable Parquet file ({err})") from None
        missing = [c for c in EVENT_COLUMNS if c not in names]
        if missing:
            raise DataImportError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(EVENT_COLUMNS)} (has {', '.join(names)})")
        return pq.read_table(path, columns=list(EVENT_COLUMNS)), False
    if suffix != ".csv":
        raise DataImportError(f"{path}: expected a .csv or .parquet event log, got {suffix or 'no extension'}")
    import pyarrow.csv as pacsv

    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        header = [h.strip() for h in next(csv.reader([f.readline()]), [])]
    missing = [c for c in EVENT_COLUMNS if c not in header]
    if missing:
        raise DataImportError(f"{path}: line 1: missing column(s) {', '.join(missing)}; expected header {','.join(EVENT_COLUMNS)} (got {','.join(header)})")
    bad_rows: list[tuple[int | None, int, int, str]] = []

    def on_invalid_row(row) -> str:
        bad_rows.append((row.number, row.expected_columns, row.actual_columns, row.text))
        return "error"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=False),  # single-threaded: rows keep their line numbers
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid_row, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(EVENT_COLUMNS),
                column_types={c: pa.string() for c in EVENT_COLUMNS},
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid as err:
        if bad_rows:
            number, expected, actual, text = bad_rows[0]
            where = f"line {number}" if number is not None else "a row"
            raise DataImportError(f"{path}: {where}: expected {expected} comma-separated fields, got {actual}: {text!r:.80}") from None
        raise DataImportError(f"{path}: {' '.join(str(err).split())}") from None
    return table, True


def _where(path: Path, row: int, column: str, text_file: bool) -> str:
    return f"{path}: line {row + 2}: column {column}" if text_file else f"{path}: row {row}: column {column}"


def _parse_timestamp(value) -> int:
    """Unix seconds (number or numeric text) or an ISO-8601 string (naive = UTC) -> int seconds."""
    if isinstance(value, datetime):
        return int((value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError
        return int(value)
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return _parse_timestamp(datetime.fromisoformat(text.replace("Z", "+00:00")))
    return _parse_timestamp(number)


def _timestamps(column: pa.ChunkedArray, path: Path, text_file: bool) -> np.ndarray:
    kind = column.type
    if pa.types.is_integer(kind) and column.null_count == 0:
        return column.to_numpy().astype(np.int64)
    if pa.types.is_timestamp(kind) and column.null_count == 0:
        return pc.cast(column, pa.timestamp("s", tz=kind.tz), safe=False).cast(pa.int64()).to_numpy()
    if pa.types.is_string(kind) or pa.types.is_floating(kind):
        try:  # fast path: all Unix seconds
            numbers = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
            if np.all(np.isfinite(numbers)):
                return np.trunc(numbers).astype(np.int64)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass  # ISO-8601 text (or bad values): parse row by row below
    out = np.empty(len(column), dtype=np.int64)
    for row, value in enumerate(column.to_pylist()):
        try:
            if value is None:
                raise ValueError
            out[row] = _parse_timestamp(value)
        except (ValueError, TypeError, OverflowError):
            raise DataImportError(
                f"{_where(path, row, 'timestamp', text_file)}: expected Unix seconds or an ISO-8601 time, got {value!r}"
            ) from None
    return out


def _id_column(column: pa.ChunkedArray, name: str, path: Path, text_file: bool) -> pa.ChunkedArray:
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_integer(column.type)):
        raise DataImportError(f"{path}: column {name}: expected string or integer ids, got {column.type}")
    column = column.cast(pa.string())
    blank = pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_trim_whitespace(column), ""))
    if pc.any(blank).as_py():
        row = int(pc.index(blank, True).as_py())
        raise DataImportError(f"{_where(path, row, name, text_file)}: expected an id, got an empty value")
    return column


def import_events(source: str | os.PathLike, out: str | os.PathLike) -> ImportSummary:
    """Import a shop event log (CSV or Parquet): user_id, item_id, event_type, timestamp."""
    path = Path(source)
    table, text_file = _read_events_table(path)
    if table.num_rows == 0:
        raise DataImportError(f"{path}: no events after the header")
    users = _id_column(table["user_id"], "user_id", path, text_file)
    items = _id_column(table["item_id"], "item_id", path, text_file)
    types = table["event_type"]
    if not (pa.types.is_string(types.type) or pa.types.is_large_string(types.type)):
        raise DataImportError(f"{path}: column event_type: expected text ({'|'.join(EVENT_TYPES)}), got {types.type}")
    types = pc.utf8_lower(pc.utf8_trim_whitespace(types.cast(pa.string())))
    bad = pc.invert(pc.fill_null(pc.is_in(types, pa.array(EVENT_TYPES)), False))
    if pc.any(bad).as_py():
        row = int(pc.index(bad, True).as_py())
        raise DataImportError(
            f"{_where(path, row, 'event_type', text_file)}: expected one of {'|'.join(EVENT_TYPES)}, got {table['event_type'][row].as_py()!r}"
        )
    ts = _timestamps(table["timestamp"], path, text_file)

    user_ids = _dense_ids(users.unique().to_pylist())
    item_ids = _dense_ids(items.unique().to_pylist())
    user_idx = pc.index_in(users, pa.array(user_ids)).to_numpy() + 1
    item_idx = pc.index_in(items, pa.array(item_ids)).to_numpy() + 1
    events = _events_table(user_idx, item_idx, types.combine_chunks(), ts)
    return _write(out, _users_table(user_ids), _items_table(item_ids, {}), events, path.stem, "events", True)

"""The dataset directory: Parquet files with an explicit schema, and the leave-one-out split.

A dataset directory holds

    dataset.json     {"name", "source_format", "n_users", "n_items", "n_attributes",
                      "n_events", "has_timestamps", "event_types"}
    users.parquet    user_idx int32 (1..n_users), user_id string (the shop's id)
    items.parquet    item_idx int32 (1..n_items), item_id string, attributes list<int32> (1..n_attributes)
    events.parquet   user_idx int32, item_idx int32, event_type string, ts int64

Index 0 is reserved for padding everywhere. Events are sorted by (user_idx, ts),
keeping the source order for ties. `ts` is Unix seconds when the source has
time (`has_timestamps`), else the event's position in the user's sequence.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "purchase")
EVENT_CODE: dict[str, int] = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}  # 0 = padding

USERS_SCHEMA = pa.schema([("user_idx", pa.int32()), ("user_id", pa.string())])
ITEMS_SCHEMA = pa.schema(
    [("item_idx", pa.int32()), ("item_id", pa.string()), ("attributes", pa.list_(pa.int32()))]
)
EVENTS_SCHEMA = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("item_idx", pa.int32()),
        ("event_type", pa.string()),
        ("ts", pa.int64()),
    ]
)


class DatasetError(ValueError):
    """A dataset directory that is missing, incomplete or inconsistent."""


@dataclass
class Dataset:
    """A loaded dataset directory. Arrays are indexed by the dense idx (row 0 = padding)."""

    path: Path
    meta: dict
    users: pa.Table
    items: pa.Table
    events: pa.Table

    @property
    def n_users(self) -> int:
        return int(self.meta["n_users"])

    @property
    def n_items(self) -> int:
        return int(self.meta["n_items"])

    @property
    def n_attributes(self) -> int:
        return int(self.meta["n_attributes"])

    @property
    def has_timestamps(self) -> bool:
        return bool(self.meta["has_timestamps"])

    @cached_property
    def item_ids(self) -> np.ndarray:
        """(n_items+1,) object array: item_idx -> shop item id ("" at 0)."""
        out = np.empty(self.n_items + 1, dtype=object)
        out[0] = ""
        out[self.items["item_idx"].to_numpy()] = self.items["item_id"].to_numpy(zero_copy_only=False)
        return out

    @cached_property
    def user_ids(self) -> np.ndarray:
        """(n_users+1,) object array: user_idx -> shop user id ("" at 0)."""
        out = np.empty(self.n_users + 1, dtype=object)
        out[0] = ""
        out[self.users["user_idx"].to_numpy()] = self.users["user_id"].to_numpy(zero_copy_only=False)
        return out

    @cached_property
    def item_attributes(self) -> np.ndarray:
        """(n_items+1, max_attributes) int32, attribute ids padded with 0."""
        lists = self.items["attributes"].to_pylist()
        width = max([len(a) for a in lists if a] + [1])
        out = np.zeros((self.n_items + 1, width), dtype=np.int32)
        for idx, attrs in zip(self.items["item_idx"].to_numpy(), lists):
            if attrs:
                out[idx, : len(attrs)] = attrs
        return out

    @cached_property
    def _user_offsets(self) -> np.ndarray:
        """(n_users+2,) offsets into the (user-sorted) events for each user_idx."""
        counts = np.bincount(self.events["user_idx"].to_numpy(), minlength=self.n_users + 1)
        return np.concatenate([[0], np.cumsum(counts)])

    def _split_by_user(self, column: np.ndarray) -> list[np.ndarray]:
        off = self._user_offsets
        return [column[off[u] : off[u + 1]] for u in range(self.n_users + 1)]

    @cached_property
    def sequences(self) -> list[np.ndarray]:
        """Per user_idx (entry 0 empty): item_idx int32 array in time order."""
        return self._split_by_user(self.events["item_idx"].to_numpy())

    @cached_property
    def event_type_sequences(self) -> list[np.ndarray]:
        """Per user_idx: event type codes (EVENT_CODE, 1..4) int8, aligned with `sequences`."""
        codes = pc.index_in(self.events["event_type"], pa.array(EVENT_TYPES)).to_numpy(zero_copy_only=False)
        return self._split_by_user((codes + 1).astype(np.int8))

    @cached_property
    def timestamp_sequences(self) -> list[np.ndarray]:
        """Per user_idx: int64 timestamps aligned with `sequences`."""
        return self._split_by_user(self.events["ts"].to_numpy())

    def item_popularity(self) -> np.ndarray:
        """(n_items+1,) int64 event counts per item over the whole dataset."""
        return np.bincount(self.events["item_idx"].to_numpy(), minlength=self.n_items + 1)


@dataclass
class LeaveOneOut:
    """The standard split: per user, last item = test target, second-to-last = validation target.

    `train[u]` is the training input (all but the last two events), `valid_input[u]` the same,
    `test_input[u]` all but the last. `users` lists the users that have a test target
    (at least three events), in user_idx order; the others only contribute training data.
    """

    train: list[np.ndarray]
    train_types: list[np.ndarray]
    valid_target: np.ndarray  # (n_users+1,) int32, 0 = none
    test_target: np.ndarray  # (n_users+1,) int32, 0 = none
    users: np.ndarray = field(repr=False)  # user_idx with valid and test targets

    def inputs(self, dataset: Dataset, which: str) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """(histories, event types, targets) for `which` in {"valid", "test"}, over `self.users`."""
        drop = {"valid": 2, "test": 1}[which]
        targets = {"valid": self.valid_target, "test": self.test_target}[which][self.users]
        hist = [dataset.sequences[u][:-drop] for u in self.users]
        types = [dataset.event_type_sequences[u][:-drop] for u in self.users]
        return hist, types, targets


def leave_one_out(dataset: Dataset) -> LeaveOneOut:
    """Split every user's sequence by position: [... train ...][valid][test]."""
    n = dataset.n_users + 1
    train, train_types = [], []
    valid_target = np.zeros(n, dtype=np.int32)
    test_target = np.zeros(n, dtype=np.int32)
    users = []
    for u, (seq, types) in enumerate(zip(dataset.sequences, dataset.event_type_sequences)):
        if len(seq) >= 3:
            train.append(seq[:-2])
            train_types.append(types[:-2])
            valid_target[u], test_target[u] = seq[-2], seq[-1]
            users.append(u)
        else:  # too short to evaluate: all of it is training data
            train.append(seq)
            train_types.append(types)
    return LeaveOneOut(train, train_types, valid_target, test_target, np.asarray(users, dtype=np.int64))


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Load a dataset directory written by `write_dataset`, checking that it is complete."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a dataset directory (run `rerank data import` first)")
    for name in ("dataset.json", "users.parquet", "items.parquet", "events.parquet"):
        if not (root / name).is_file():
            raise DatasetError(f"{root / name}: missing; the dataset directory is incomplete")
    meta = json.loads((root / "dataset.json").read_text())
    tables = {}
    for name, schema in (("users", USERS_SCHEMA), ("items", ITEMS_SCHEMA), ("events", EVENTS_SCHEMA)):
        table = pq.read_table(root / f"{name}.parquet")
        if not table.schema.equals(schema, check_metadata=False):
            raise DatasetError(f"{root / name}.parquet: schema {table.schema} does not match {schema}")
        tables[name] = table
    return Dataset(root, meta, tables["users"], tables["items"], tables["events"])


def write_dataset(
    out: str | os.PathLike,
    users: pa.Table,
    items: pa.Table,
    events: pa.Table,
    name: str,
    source_format: str,
    has_timestamps: bool,
) -> Path:
    """Write a dataset directory atomically: a temporary sibling is renamed into place.

    `events` need not be sorted; they are sorted here by (user_idx, ts) keeping the
    source order for ties. Nothing is left behind if writing fails.
    """
    out = Path(out)
    if out.exists() and not (out / "dataset.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        # never delete something that is not a dataset directory (`--out .` must not wipe a folder)
        raise DatasetError(f"{out}: exists and is not a dataset directory; refusing to replace it")
    users = users.cast(USERS_SCHEMA)
    items = items.cast(ITEMS_SCHEMA)
    events = events.cast(EVENTS_SCHEMA)
    order = np.lexsort((np.arange(events.num_rows), events["ts"].to_numpy(), events["user_idx"].to_numpy()))
    events = events.take(pa.array(order))
    attrs = pc.list_flatten(items["attributes"])
    meta = {
        "name": name,
        "source_format": source_format,
        "n_users": users.num_rows,
        "n_items": items.num_rows,
        "n_attributes": int(pc.max(attrs).as_py() or 0) if len(attrs) else 0,
        "n_events": events.num_rows,
        "has_timestamps": has_timestamps,
        "event_types": sorted(set(events["event_type"].to_pylist()) if events.num_rows else []),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pq.write_table(users, tmp / "users.parquet")
        pq.write_table(items, tmp / "items.parquet")
        pq.write_table(events, tmp / "events.parquet")
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():  # move the previous version aside, so a failed rename can put it back
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "dataset")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "dataset", out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out

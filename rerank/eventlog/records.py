"""The two analysis records, impressions and events: their stream fields, one parser each, and
their Parquet schema.

    impression  one /rank answer: what was shown to whom, in which experiment arm, by which
                model. Written by the ingress to the `{prefix}impressions` stream.
    event       one behaviour event (rerank.store.events writes it to `{prefix}events`), with
                its attribution to an impression when there is one. Its stream fields are
                rerank.store.entry's (the one definition: EventEntry decodes them).

Stream fields are strings (Redis). An impression's items travel as one compact JSON field,
`[[item_id, score, team], ...]` in position order (position = index + 1; team = the arm whose
list contributed the item under interleaving, "" otherwise). A stored impression keeps the
answer's first items only (`Impression.stored`: at most max_impression_items, and at most
max_impression_bytes of that JSON, rerank.experiments.attribution.AttributionConfig); `n_items`
says how many the answer had, so `n_items > len(items)` marks a truncated one (clicks on its
later positions cannot be attributed to it). Entries and rows from before the field read
`n_items` as their item count (stream) or null (Parquet written before). The Parquet tables written by
rerank.eventlog.sink add `stream_id` (the Redis entry id, unique: what makes a rewrite idempotent) and
`day` (UTC date of the stream id, the partition column).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass, field

import pyarrow as pa

from rerank.store.entry import EventEntry, float_field, required_field

IMPRESSION_ITEM = pa.struct([("item_id", pa.string()), ("position", pa.int32()), ("score", pa.float64()),
                             ("team", pa.string())])
IMPRESSION_SCHEMA = pa.schema([
    ("stream_id", pa.string()),
    ("request_id", pa.string()),
    ("user_id", pa.string()),
    ("experiment", pa.string()),  # "" = the user is in no experiment
    ("arm", pa.string()),  # arm name ("default" outside experiments; "interleaved" for interleaving)
    ("model_version", pa.string()),
    ("ts", pa.float64()),  # Unix seconds of the answer
    ("items", pa.list_(IMPRESSION_ITEM)),
    ("n_items", pa.int32()),  # items the answer had; more than len(items) = truncated (null: written before)
    ("day", pa.string()),  # YYYY-MM-DD (UTC) of stream_id: the partition
])
EVENT_SCHEMA = pa.schema([
    ("stream_id", pa.string()),
    ("event_id", pa.string()),
    ("user_id", pa.string()),
    ("item_id", pa.string()),
    ("item_idx", pa.int32()),
    ("type", pa.string()),  # view | click | cart | purchase
    ("ts", pa.float64()),
    ("request_id", pa.string()),  # the impression it is attributed to; null = none
    ("position", pa.int32()),  # 1-based position of the item in that impression; null = none
    ("experiment", pa.string()),
    ("arm", pa.string()),  # the user's arm (from the impression, else the user's assignment)
    ("team", pa.string()),  # interleaving: the arm whose list contributed the item
    ("attributed", pa.string()),  # "request_id" | "window" | "" (not attributed)
    ("value", pa.float64()),  # revenue of a purchase when the client sent a price; null = unknown
    ("day", pa.string()),
])


def stream_day(stream_id: str) -> str:
    """UTC date (YYYY-MM-DD) of a Redis stream id "ms-seq"."""
    ms = int(stream_id.partition("-")[0])
    return dt.datetime.fromtimestamp(ms / 1000.0, dt.timezone.utc).strftime("%Y-%m-%d")


@dataclass
class Impression:
    """One ranking answer as shown. items: (item_id, score, team) in position order."""

    request_id: str
    user_id: str
    experiment: str
    arm: str
    model_version: str
    ts: float
    items: list[tuple[str, float, str]] = field(default_factory=list)
    n_items: int | None = None  # items the answer had (None: len(items)); more than len(items) = truncated

    @property
    def truncated(self) -> bool:
        return self.n_items is not None and self.n_items > len(self.items)

    def stored(self, max_items: int, max_bytes: int) -> "Impression":
        """The impression as stored: its first items, at most `max_items` of them and at most
        `max_bytes` of the `items` JSON (at least the first item when there is one); `n_items` keeps
        the answer's count. Itself when nothing is cut."""
        n = min(len(self.items), max_items)
        size = 2  # the brackets
        for k in range(n):
            size += len(_item_json(self.items[k]).encode()) + (k > 0)
            if size > max_bytes and k > 0:
                n = k
                break
        if n == len(self.items):
            return self
        return dataclasses.replace(self, items=self.items[:n],
                                   n_items=len(self.items) if self.n_items is None else self.n_items)

    def to_fields(self) -> dict[str, str]:
        """The stream entry (all strings); non-finite scores are written as null."""
        return {"request_id": self.request_id, "user_id": self.user_id, "experiment": self.experiment,
                "arm": self.arm, "model_version": self.model_version, "ts": repr(float(self.ts)),
                "items": "[" + ",".join(map(_item_json, self.items)) + "]",
                "n_items": str(len(self.items) if self.n_items is None else self.n_items)}


def _item_json(item: tuple[str, float, str]) -> str:
    item_id, score, team = item
    return json.dumps([item_id, score if math.isfinite(score) else None, team], separators=(",", ":"),
                      ensure_ascii=False)


def impression_row(stream_id: str, fields: dict[str, str]) -> dict:
    """The Parquet row (IMPRESSION_SCHEMA) of one impressions-stream entry; ValueError names the field."""
    try:
        raw = json.loads(required_field(fields, "items"))
    except json.JSONDecodeError:
        raise ValueError("field 'items': not JSON") from None
    if not isinstance(raw, list) or not all(isinstance(x, list) and len(x) == 3 for x in raw):
        raise ValueError("field 'items': expected [[item_id, score, team], ...]")
    items = [{"item_id": str(item_id), "position": pos, "score": None if score is None else float(score),
              "team": str(team)} for pos, (item_id, score, team) in enumerate(raw, start=1)]
    n_items = len(items)
    if "n_items" in fields:  # absent in entries from before truncation existed
        try:
            n_items = int(fields["n_items"])
        except ValueError:
            raise ValueError(f"field 'n_items': not an integer: {fields['n_items']!r}") from None
        if n_items < len(items):
            raise ValueError(f"field 'n_items': {n_items}, fewer than the {len(items)} items stored")
    return {"stream_id": stream_id, "request_id": required_field(fields, "request_id"), "user_id": required_field(fields, "user_id"),
            "experiment": required_field(fields, "experiment"), "arm": required_field(fields, "arm"),
            "model_version": required_field(fields, "model_version"), "ts": float_field(fields, "ts"), "items": items,
            "n_items": n_items, "day": stream_day(stream_id)}


def event_row(stream_id: str, fields: dict[str, str]) -> dict:
    """The Parquet row (EVENT_SCHEMA) of one events-stream entry; entries written before
    attribution existed read as unattributed. ValueError names the field."""
    e = EventEntry.from_fields(fields)
    return {"stream_id": stream_id, "event_id": e.event_id, "user_id": e.user_id, "item_id": e.item_id,
            "item_idx": e.item_idx, "type": e.type, "ts": e.ts, "request_id": e.request_id, "position": e.position,
            "experiment": e.experiment, "arm": e.arm, "team": e.team, "attributed": e.attributed, "value": e.value,
            "day": stream_day(stream_id)}


def impressions_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=IMPRESSION_SCHEMA)


def events_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


def explode_impressions(impressions: pa.Table) -> pa.Table:
    """One row per shown item: request_id, user_id, experiment, arm, ts, item_id, position, score, team."""
    import pyarrow.compute as pc

    parent = pc.list_parent_indices(impressions["items"])
    flat = pc.list_flatten(impressions["items"])
    columns = {name: pc.take(impressions[name], parent)
               for name in ("request_id", "user_id", "experiment", "arm", "ts")}
    for name in ("item_id", "position", "score", "team"):
        columns[name] = pc.struct_field(flat, name)
    return pa.table(columns)

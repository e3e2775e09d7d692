"""One entry of the events stream (`Keys(prefix).events`): its fields, named once, and their decoding.

The event script (rerank.store.events) writes one entry per applied event, its field list built
from the names below; the online trainer reads `seq`, `item_idx`, `type` and `n`; the Parquet
sink reads the rest (rerank.eventlog.records.event_row, through `EventEntry.from_fields`).
Stream fields are strings:

    field        encoding                                         decoded (EventEntry)
    event_id     the client's event_id, else a server uuid        str
    user_id      text                                             str
    item_id      text                                             str
    item_idx     decimal; 0 = a new item refused by item_capacity str -> int
                 or the new-item rate: in no history or counter
    type         event type name: view | click | cart | purchase  str
    ts           repr(float) of Unix seconds                      float
    seq          the user's recent "item_idx:type_code" pairs     str; `parse_seq` -> arrays
                 BEFORE this event, oldest first, space separated,
                 at most stream_seq_len
    request_id, position, experiment, arm, team, attributed, value
                 ATTRIBUTION_FIELDS: the event's `extra` fields  str | None, int | None, str..., float | None
                 (rerank.experiments.attribution; "" = none;
                 absent in entries from before attribution)
    n            decimal: the entry's number from Keys.events_seq int | None (`entry_number`)
                 (consecutive: a consumer that sees n jump knows
                 how many entries MAXLEN trimmed before it read them)

In the entry the script writes EVENT_FIELDS first (in that order), then the `extra` fields as the
caller gave them, then NUMBER.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from rerank.data.dataset import EVENT_CODE

EVENT_ID = "event_id"
USER_ID = "user_id"
ITEM_ID = "item_id"
ITEM_IDX = "item_idx"
TYPE = "type"
TS = "ts"
SEQ = "seq"
NUMBER = "n"
EVENT_FIELDS = (EVENT_ID, USER_ID, ITEM_ID, ITEM_IDX, TYPE, TS, SEQ)  # what the script writes first, in order
REQUEST_ID, POSITION, EXPERIMENT, ARM, TEAM, ATTRIBUTED, VALUE = (
    "request_id", "position", "experiment", "arm", "team", "attributed", "value")
ATTRIBUTION_FIELDS = (REQUEST_ID, POSITION, EXPERIMENT, ARM, TEAM, ATTRIBUTED, VALUE)
FIELDS = EVENT_FIELDS + ATTRIBUTION_FIELDS + (NUMBER,)


@dataclass(frozen=True)
class EventEntry:
    """One events-stream entry, typed."""

    event_id: str
    user_id: str
    item_id: str
    item_idx: int
    type: str
    ts: float
    seq: str  # as written ("12:1 40:4"); parse_seq(seq) gives the arrays
    request_id: str | None  # None = not attributed
    position: int | None  # 1-based position in that impression; None = none
    experiment: str
    arm: str
    team: str
    attributed: str  # "request_id" | "window" | ""
    value: float | None  # revenue of a purchase when the client sent a price
    n: int | None  # the entry's number (None: an entry from before the numbering)

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> "EventEntry":
        """Decode an entry's fields; entries written before attribution existed read as
        unattributed. ValueError names the field (`seq` is kept as text, not checked)."""
        position, value = _optional(fields, POSITION), _optional(fields, VALUE)
        try:
            item_idx = int(required_field(fields, ITEM_IDX))
            position_num = int(position) if position is not None else None
        except ValueError:
            raise ValueError(f"field {ITEM_IDX!r} or 'position': not an integer") from None
        return cls(
            event_id=required_field(fields, EVENT_ID), user_id=required_field(fields, USER_ID),
            item_id=required_field(fields, ITEM_ID), item_idx=item_idx, type=required_field(fields, TYPE),
            ts=float_field(fields, TS), seq=fields.get(SEQ, ""), request_id=_optional(fields, REQUEST_ID),
            position=position_num, experiment=fields.get(EXPERIMENT, ""), arm=fields.get(ARM, ""),
            team=fields.get(TEAM, ""), attributed=fields.get(ATTRIBUTED, ""),
            value=float(value) if value is not None else None, n=entry_number(fields),
        )  # fmt: skip


def required_field(fields: Mapping[str, str], name: str) -> str:
    """A stream field's text; ValueError naming it when it is missing."""
    if name not in fields:
        raise ValueError(f"field {name!r} missing")
    return fields[name]


def _optional(fields: Mapping[str, str], name: str) -> str | None:
    return fields.get(name, "") or None


def float_field(fields: Mapping[str, str], name: str) -> float:
    """A stream field as a float; ValueError naming it when it is missing or not a number."""
    text = required_field(fields, name)  # a missing field says so (not a KeyError from the message below)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"field {name!r}: not a number: {text!r}") from None


def entry_number(fields: Mapping[str, str]) -> int | None:
    """The entry's number `n`; None when it has none (or not an integer): an entry from before the numbering."""
    try:
        return int(fields[NUMBER])
    except (KeyError, ValueError):
        return None


def parse_seq(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse a stream `seq` field: tokens "idx" or "idx:type" (type a code or a name), oldest first.

    Separators: comma or whitespace. Raises ValueError naming the bad token. Returns
    (item_idx, type codes), both int64.
    """
    items, types = [], []
    for tok in text.replace(",", " ").split():
        idx, _, typ = tok.partition(":")
        try:
            items.append(int(idx))
        except ValueError:
            raise ValueError(f"seq token {tok!r}: expected item_idx[:type]") from None
        if not typ:
            types.append(EVENT_CODE["purchase"])
        elif typ.isdigit():
            types.append(int(typ))
        elif typ in EVENT_CODE:
            types.append(EVENT_CODE[typ])
        else:
            raise ValueError(f"seq token {tok!r}: unknown event type {typ!r}")
    return np.asarray(items, dtype=np.int64), np.asarray(types, dtype=np.int64)

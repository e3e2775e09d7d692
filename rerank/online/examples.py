"""Next-item examples from event-stream entries, and the tensors and loss a step trains on.

A stream entry (fields of rerank.store.feature_store's XADD) is one example: the pre-event
sequence (`seq`, oldest first) -> the event's item (`example_from_entry`). `is_holdout` is the
stable 1-in-`holdout_every` choice of held-out examples (rerank.online.loop makes it server-side,
by the stream entry id under the registry's secret salt); `in_arm` selects an experiment arm's
entries. `batch_tensors` left-pads a batch for the last position, and `last_position_loss` is the
offline loss (full-softmax cross-entropy) there: the only new transition an event brings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from rerank.data.dataset import EVENT_CODE
from rerank.store import entry

if TYPE_CHECKING:
    from rerank.store.stream import StreamEntry


@dataclass
class Example:
    """One next-item example from a stream entry: seq (oldest->newest) and its types -> target."""

    seq: np.ndarray  # int64 item_idx
    types: np.ndarray  # int64 EVENT_CODE
    target: int
    target_type: int
    event_id: str = ""
    item_id: str = ""
    entry_id: str = ""


def is_holdout(key: str, every: int, salt: bytes = b"") -> bool:
    """Stable 1-in-`every` choice by `key` under `salt` (the same for the same key and salt).

    The online loop passes the stream entry id and the registry's secret salt (server-side,
    see rerank.online.loop); the prequential benchmark passes its event ids, unsalted.
    """
    if every <= 0:
        return False
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=salt[:64]).digest()
    return int.from_bytes(digest, "little") % every == 0


def in_arm(fields: dict[str, str], only_arm: str) -> bool:
    """Whether a stream entry belongs to the experiment arm "experiment/arm" (its attribution
    fields, rerank.store.entry: the impression's arm, else the user's assignment at event time)."""
    experiment, _, arm = only_arm.partition("/")
    return fields.get(entry.EXPERIMENT) == experiment and fields.get(entry.ARM) == arm


def example_from_entry(stream_entry: "StreamEntry") -> Example:
    """Example of a stream entry (rerank.store.entry's fields); ValueError names the field."""
    f, entry_id = stream_entry.fields, stream_entry.id
    for name in (entry.ITEM_IDX, entry.TYPE):
        if name not in f:
            raise ValueError(f"stream entry {entry_id}: field {name!r} missing")
    try:
        target = int(f[entry.ITEM_IDX])
    except ValueError:
        raise ValueError(f"stream entry {entry_id}: field 'item_idx': expected an int, got {f[entry.ITEM_IDX]!r}") from None
    typ = f[entry.TYPE]
    if typ not in EVENT_CODE:
        raise ValueError(f"stream entry {entry_id}: field 'type': unknown event type {typ!r}")
    seq, types = entry.parse_seq(f.get(entry.SEQ, ""))
    return Example(seq, types, target, EVENT_CODE[typ], f.get(entry.EVENT_ID, entry_id), f.get(entry.ITEM_ID, ""),
                   entry_id)


def _left_pad(rows: list[np.ndarray], length: int) -> np.ndarray:
    width = max(1, min(length, max((len(r) for r in rows), default=1)))
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        tail = r[-width:]
        if len(tail):
            out[i, width - len(tail):] = tail
    return out


def batch_tensors(examples: list[Example], max_len: int, n_items: int, device) -> tuple[torch.Tensor, ...]:
    """(seq, types, targets) for the last position; items beyond n_items read as padding."""
    seq = _left_pad([e.seq for e in examples], max_len)
    types = _left_pad([e.types for e in examples], max_len)
    bad = (seq < 0) | (seq > n_items)
    seq[bad], types[bad] = 0, 0
    types[seq == 0] = 0
    targets = np.asarray([e.target for e in examples], dtype=np.int64)
    to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return to(seq), to(types), to(targets)


def last_position_loss(module, seq: torch.Tensor, types: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's own training loss (full-softmax CE) with a target at the last position only."""
    y = torch.zeros_like(seq)
    y[:, -1] = targets
    return module.loss(seq, types, y)

"""Binary values of the store: a user's sequence records and an item's counters, one layout each.

    SEQ_RECORD   13 bytes, Lua struct SEQ_STRUCT "<ibd": item_idx, event type code (1..4), ts
                 (one list element of Keys.user_seq, newest first)
    ITEM_RECORD  28 bytes, Lua struct ITEM_STRUCT "<iIIIId": item_idx, views, clicks, carts,
                 purchases, last_ts (one field value of Keys.item_stats; one HMGET per batch gives
                 idx + counters for all candidates)

Binary records keep the hot read path to one HMGET/LRANGE per batch plus one `np.frombuffer`.
The event script (rerank.store.events) packs them with the struct formats below, numpy reads
them with the dtypes; the two are checked against each other at import.
"""

from __future__ import annotations

import numpy as np

SEQ_STRUCT = "<ibd"
SEQ_RECORD = np.dtype([("idx", "<i4"), ("type", "i1"), ("ts", "<f8")])
ITEM_STRUCT = "<iIIIId"
ITEM_RECORD = np.dtype(
    [("idx", "<i4"), ("views", "<u4"), ("clicks", "<u4"), ("carts", "<u4"), ("purchases", "<u4"), ("last_ts", "<f8")]
)
STAT_FIELDS = ("views", "clicks", "carts", "purchases")  # candidate_stats columns, = EVENT_TYPES order
NO_ITEM = bytes(ITEM_RECORD.itemsize)  # the record of an unknown item: idx 0, no counts

_STRUCT_CODES = {"b": "i1", "i": "<i4", "I": "<u4", "d": "<f8"}  # little-endian, unpadded ("<")


def _check(fmt: str, dtype: np.dtype) -> None:
    codes = [np.dtype(_STRUCT_CODES[c]) for c in fmt[1:]]
    if fmt[0] != "<" or codes != [dtype.fields[name][0] for name in dtype.names]:
        raise AssertionError(f"struct {fmt!r} does not match {dtype}")


_check(SEQ_STRUCT, SEQ_RECORD)
_check(ITEM_STRUCT, ITEM_RECORD)


def decode_seq(entries: list[bytes]) -> np.ndarray:
    """LRANGE of a user's seq key (newest first) -> SEQ_RECORD array, oldest -> newest."""
    if not entries:
        return np.zeros(0, dtype=SEQ_RECORD)
    return np.frombuffer(b"".join(entries), dtype=SEQ_RECORD)[::-1]

"""A replica's cache of candidate item records, so a /rank batch asks Redis only for what it lacks.

Every /rank candidate needs its packed item record (rerank.store.layout.ITEM_RECORD: item_idx and
the view/click/cart/purchase counters) from the item stats hash; with 200 candidates a request
that HMGET is most of a batch's Redis bytes, and popular items are asked for again and again.
`FeatureStore.fetch(..., item_cache=cache)` takes the records this cache holds fresh from it and
asks Redis only for the users' keys and the other candidates, in the same one round trip; the
records Redis returns are put back. Attributes are not cached here: they come from the
in-process catalogue (rerank.serving.catalogue).

Staleness it allows (ttl_s, 1 s by default; 0 = no cache, `FeatureFetcher` then reads as before):

- A record is served while `now - read_at < ttl_s`, where `read_at` is taken just BEFORE the round
  trip that read it (time.monotonic), so what a request gets is what Redis held at some moment
  within the last ttl_s: counters lag Redis by less than ttl_s, never more.
- That holds for unknown items too: an item Redis did not know (item_idx 0, no counters) is cached
  as unknown and re-read after ttl_s, so an item registered by an event (or a bulk load) is ranked
  with its item_idx at most ttl_s after Redis has it. A known item's idx never changes (the store
  assigns it once), but it expires with its counters: nothing is kept longer than ttl_s, so even a
  store emptied and reloaded with other idx is followed within ttl_s.
- Events written through this replica (/events) do NOT invalidate it: their counters show up
  within the same ttl_s bound, like any other replica's. Users' histories and bought sets are
  never cached: every batch reads them from Redis.
- Candidates of one request may come from reads up to ttl_s apart (some cached, some just read);
  within one batch every request sees the same record for the same item.
- The cache is per replica (one per FeatureFetcher): n replicas read a hot item n times per ttl_s.

Size: at most `max_entries` records and `max_bytes` bytes, counted as this object's own memory:
the slot arrays, allocated up front for the most entries that can fit (SLOT_BYTES each, and one
spare), plus
per entry its key string (sys.getsizeof) and its index entry (ENTRY_OVERHEAD: the dict slot, at
most ~44 B just after a resize, and the slot number's int object, 28 B). `nbytes` never exceeds
max_bytes (tests/test_item_cache.py checks the count and the memory tracemalloc sees); an item
whose entry alone does not fit is simply not cached. Eviction is a clock (second chance): a lookup
hit sets the slot's reference bit, the hand takes the first empty, expired or unreferenced slot and
clears the bits it passes.

Thread-safe: one lock around each lookup and each put (the fetch runs in worker threads).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from itertools import repeat
from typing import Callable, Sequence

import numpy as np

from rerank.store.layout import ITEM_RECORD

# per slot: the record, its read time (f8), reference and live bits, and the slot -> key pointer
SLOT_BYTES = ITEM_RECORD.itemsize + 8 + 1 + 1 + 8
ENTRY_OVERHEAD = 96  # per entry in the key -> slot dict: its slot (<= ~44 B at worst) + the int (28 B) + margin
FIXED_BYTES = 2048  # the object, its lock, dict and array headers
MIN_KEY_BYTES = sys.getsizeof("")  # the smallest str object
_SCAN = 256  # slots the clock hand looks at per numpy step


def entry_bytes(item_id: str) -> int:
    """What caching `item_id` adds to `ItemCache.nbytes` beyond its slot."""
    return sys.getsizeof(item_id) + ENTRY_OVERHEAD


class ItemCache:
    """Item records (ITEM_RECORD) by item id, each served for at most `ttl_s` (see the module docstring).

    `lookup(ids) -> (records, hit)` and `put(ids, records, read_at)` are what FeatureStore.fetch
    calls; `clock()` is the time base of `read_at` (time.monotonic unless a test passes another).
    """

    def __init__(self, ttl_s: float = 1.0, max_entries: int = 100_000, max_bytes: int = 32 * 1024 * 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(ttl_s, bool) or not (isinstance(ttl_s, (int, float)) and math.isfinite(ttl_s) and ttl_s >= 0):
            raise ValueError(f"ItemCache.ttl_s must be a finite number of seconds >= 0, got {ttl_s!r}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"ItemCache.max_entries must be an int >= 1, got {max_entries!r}")
        smallest = FIXED_BYTES + 2 * SLOT_BYTES + MIN_KEY_BYTES + ENTRY_OVERHEAD
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < smallest:
            raise ValueError(f"ItemCache.max_bytes must be an int >= {smallest} (one entry), got {max_bytes!r}")
        self.ttl_s = float(ttl_s)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        # as many slots as the most entries (each at least its slot + the smallest key) that fit
        self.capacity = min(max_entries,
                            (max_bytes - FIXED_BYTES - SLOT_BYTES) // (SLOT_BYTES + MIN_KEY_BYTES + ENTRY_OVERHEAD))
        self._lock = threading.Lock()
        self._slot: dict[str, int] = {}
        self._keys: list[str | None] = [None] * self.capacity
        # one spare slot more (index `capacity`): where lookups of ids not held point
        self._records = np.zeros(self.capacity + 1, dtype=ITEM_RECORD)
        self._read_at = np.zeros(self.capacity + 1, dtype=np.float64)
        self._read_at[self.capacity] = -np.inf
        self._ref = np.zeros(self.capacity, dtype=bool)
        self._live = np.zeros(self.capacity, dtype=bool)
        self._hand = 0
        self._used = 0  # slots below it have been used (the clock reuses them), the others never
        self._nbytes = FIXED_BYTES + (self.capacity + 1) * SLOT_BYTES
        self._counts = {"hits": 0, "misses": 0, "expired": 0, "puts": 0, "evictions": 0, "too_big": 0}

    # Ray pickles deployments' arguments: another process gets an empty cache of the same settings.
    def __getstate__(self) -> dict:
        return {"ttl_s": self.ttl_s, "max_entries": self.max_entries, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def nbytes(self) -> int:
        """Bytes this cache holds by its own count (always <= max_bytes)."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._slot)

    def stats(self) -> dict:
        """Counters since start: hits, misses (not cached), expired (cached but older than ttl_s),
        puts, evictions, too_big (entries that alone exceed max_bytes); entries, nbytes."""
        with self._lock:
            return {**self._counts, "entries": len(self._slot), "nbytes": self._nbytes}

    def lookup(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(records (N,) ITEM_RECORD, hit (N,) bool): the fresh records held for `item_ids`; rows
        without a hit are zero (the caller reads them from Redis)."""
        n = len(item_ids)
        if n == 0:
            return np.zeros(0, dtype=ITEM_RECORD), np.zeros(0, dtype=bool)
        none = self.capacity  # the spare slot: never live, read at -inf
        with self._lock:
            slots = np.fromiter(map(self._slot.get, item_ids, repeat(none)), dtype=np.int64, count=n)
            hit = self._read_at[slots] > self.clock() - self.ttl_s
            # np.take / np.put: fancy indexing of a structured array is ~10x slower
            records = np.take(self._records, np.where(hit, slots, none))  # the spare slot's record is zero
            hit_slots = slots[hit]
            self._ref[hit_slots] = True
            hits, found = len(hit_slots), n - int(np.count_nonzero(slots == none))
            self._counts["hits"] += hits
            self._counts["expired"] += found - hits
            self._counts["misses"] += n - found
        return records, hit

    def put(self, item_ids: Sequence[str], records: np.ndarray, read_at: float) -> None:
        """Cache `records` (ITEM_RECORD, one per id) as read from Redis at `read_at` (a `clock()`
        value taken before the read). A record older than the one held is ignored; ids may repeat."""
        n = len(item_ids)
        if n != len(records):
            raise ValueError(f"ItemCache.put: {n} ids but {len(records)} records")
        with self._lock:
            now = self.clock()
            if n == 0 or read_at <= now - self.ttl_s:
                return  # expired already: it would never be served
            slots = np.fromiter(map(self._slot.get, item_ids, repeat(-1)), dtype=np.int64, count=n)
            held = slots >= 0
            if held.any():  # refresh what is held (expired entries come back here)
                rows = np.flatnonzero(held)
                rows = rows[self._read_at[slots[rows]] <= read_at]
                np.put(self._records, slots[rows], np.take(records, rows))
                self._read_at[slots[rows]] = read_at
            if not held.all():
                new_rows = np.flatnonzero(~held).tolist()
                pending = dict(zip([item_ids[i] for i in new_rows], new_rows))  # a repeated id: its last row
                self._insert(list(pending), list(pending.values()), records, read_at, now)

    # ---- the clock -----------------------------------------------------------------------------

    def _insert(self, ids: list[str], rows: list[int], records: np.ndarray, read_at: float, now: float) -> None:
        room = self.max_bytes - FIXED_BYTES - (self.capacity + 1) * SLOT_BYTES  # for entries' keys and index
        costs = [size + ENTRY_OVERHEAD for size in map(sys.getsizeof, ids)]
        total = sum(costs)
        if len(ids) > self.capacity or total > room:
            # more than the whole cache holds: the newest ids that fit together (the clock would
            # evict the older ones of the same put for them anyway)
            keep, total = [], 0
            for j in range(len(ids) - 1, -1, -1):
                if costs[j] > room:
                    self._counts["too_big"] += 1
                elif len(keep) < self.capacity and total + costs[j] <= room:
                    keep.append(j)
                    total += costs[j]
            keep.reverse()
            ids, rows, costs = [ids[j] for j in keep], [rows[j] for j in keep], [costs[j] for j in keep]
        if not ids:
            return
        if self._used + len(ids) <= self.capacity and self._nbytes + total <= self.max_bytes:
            # not full yet: slots never used, nothing to evict
            self._fill(ids, rows, list(range(self._used, self._used + len(ids))), records, read_at, total)
            return
        pos = 0
        while pos < len(ids):
            slots = self._victims(len(ids) - pos, now, empty_ok=True)
            chunk = slice(pos, pos + len(slots))
            pos += len(slots)
            slot_arr = np.asarray(slots, dtype=np.int64)
            self._evict(slot_arr[self._live[slot_arr]])
            need = sum(costs[chunk])
            while self._nbytes + need > self.max_bytes:  # ids longer than the slots assumed
                per_entry = (self._nbytes - (self.max_bytes - room)) / max(len(self._slot), 1)
                victims = self._victims(max(1, math.ceil((self._nbytes + need - self.max_bytes) / per_entry)),
                                        now, empty_ok=False)
                if not victims:  # cannot happen: what is left of `ids` fits in `room`
                    break
                self._evict(np.asarray(victims, dtype=np.int64))
            self._fill(ids[chunk], rows[chunk], slots, records, read_at, need)

    def _fill(self, ids: list[str], rows: list[int], slots: list[int], records: np.ndarray, read_at: float,
              nbytes: int) -> None:
        self._slot.update(zip(ids, slots))
        for slot, item_id in zip(slots, ids):
            self._keys[slot] = item_id
        index = np.asarray(slots, dtype=np.int64)
        self._live[index] = True
        self._ref[index] = False
        self._read_at[index] = read_at
        np.put(self._records, index, np.take(records, rows))
        self._nbytes += nbytes
        self._used = max(self._used, int(index.max()) + 1)
        self._counts["puts"] += len(ids)

    def _evict(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            item_id = self._keys[slot]
            del self._slot[item_id]
            self._nbytes -= entry_bytes(item_id)
            self._keys[slot] = None
        self._live[slots] = False
        self._counts["evictions"] += len(slots)

    def _victims(self, want: int, now: float, empty_ok: bool) -> list[int]:
        """Up to `want` slots from the hand on, in clock order: live ones expired or unreferenced
        (and empty ones when `empty_ok`); the reference bits passed over are cleared. Two laps at
        most: the first clears every bit it passes, so the second finds what it looks for."""
        cap, cutoff = self.capacity, now - self.ttl_s
        out: list[int] = []
        scanned = 0
        while len(out) < want and scanned < 2 * cap + _SCAN:
            lo = self._hand
            hi = min(lo + max(_SCAN, 2 * (want - len(out))), cap)
            live = self._live[lo:hi]
            ok = live & (~self._ref[lo:hi] | (self._read_at[lo:hi] <= cutoff))
            if empty_ok:
                ok |= ~live
            found = np.flatnonzero(ok)[: want - len(out)]
            end = hi if len(out) + len(found) < want else lo + int(found[-1]) + 1
            self._ref[lo:end] = False
            self._hand = end % cap
            scanned += end - lo
            out.extend((lo + found).tolist())
        return list(dict.fromkeys(out))  # a second lap may meet a slot of the first again

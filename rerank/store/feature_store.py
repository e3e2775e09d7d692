"""The online feature store: users' recent behaviour and item statistics in Redis.

This module is the client (FeatureStore: connection, reads, and the entry points of every job);
the jobs live beside it in rerank.store:

    keys       the key schema (Keys, DEFAULT_PREFIX): every key's name, type and owner
    layout     the binary values (SEQ_RECORD, ITEM_RECORD, decode_seq)
    entry      the event stream's entry: its fields, EventEntry, parse_seq
    events     Event, validate_event and the event script (write_events, WriteResult)
    bulk_load  a Dataset into the store
    capacity   the item_idx space (new_item_room, ensure_item_floor), the server's memory
               (server_memory, check_server) and the memory plan of the bounds (project_memory,
               check_memory_plan, embedded_maxmemory)
    config     FeatureStoreConfig;  errors  FeatureStoreUnavailable / FeatureStoreError / EventValidationError

Items: item_idx is dense (1..) and never changes once assigned. `next_item_idx` is the highest
assigned so far; items first seen in events get the next one (up to `item_capacity` when set;
beyond it they get idx 0: see "Bounded state"). An emptied Redis starts it at 0 again:
`ensure_item_floor(model's n_items)` keeps new items clear of the idx the served model already
uses. A user's sequence holds their events newest first, capped at max_history (LTRIM), with a TTL
of user_ttl_s renewed on every event; their bought set (a sorted set item_idx -> ts of the latest
purchase) keeps the max_bought most recent purchases, with the same TTL. An idempotency marker
exists ONLY for events whose client sent an event_id (an event without one gets a server uuid in
the stream but no marker: nobody can retry it), for event_ttl_s (6 h by default). The events stream has one
entry per applied event (XADD MAXLEN ~ stream_maxlen; fields: rerank.store.entry).

Bounded state: user keys expire (user_ttl_s) and are capped (max_history events, max_bought
purchases; ids at most MAX_ID_LENGTH characters), the stream is capped (stream_maxlen,
~0.5 KB an entry at stream_seq_len 50, so ~0.5 GB at the default cap; a consumer that falls
further behind than the cap loses the oldest entries, and the online trainer counts them from
the gaps in `n`: `events_trimmed_unapplied`, metric rerank_online_events_trimmed_unapplied), idempotency
markers exist only for client event_ids and expire (event_ttl_s; ~125 B each, so
200 events/s with ids for 6 h is ~4.3 M markers, ~0.5 GB, and for 7 days would be ~15 GB: size
event_ttl_s to the retry window; rerank.store.capacity projects it against maxmemory,
`project_memory` / `check_memory_plan`). The catalogue grows by one item per unseen item_id unless
`item_capacity` is set (and by at most `new_item_rate_per_min` a minute when that is set);
events naming a new item beyond either are still applied (stream entry with item_idx 0,
marker) but leave the user's history, bought set and item
counters alone; `write_events_detailed` counts them and `new_item_room()` tells what
is left. Redis itself should run with `maxmemory` and `maxmemory-policy noeviction`
(rerank.store.capacity): full, it refuses writes with OOM (FeatureStoreUnavailable) instead of
evicting histories, stream entries, the item map or idempotency markers.

Failures (rerank.store.errors): socket timeouts are small (0.2 s by default) and a dead pooled
connection is retried once. An unreachable or timed-out server, or a transient error reply (OOM,
READONLY, LOADING, BUSY, ...), raises FeatureStoreUnavailable: serving degrades, the event API
answers with a retryable status. A write batch that failed that way may be partly applied;
retrying it with the same event_ids applies each event exactly once (rerank.store.events).

Timestamps are Unix seconds (float). The sequence is in arrival order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rerank.store import bulk_load as _bulk_load
from rerank.store import capacity
from rerank.store.config import FeatureStoreConfig
from rerank.store.errors import UNAVAILABLE, FeatureStoreError, FeatureStoreUnavailable, is_transient, unavailable
from rerank.store.events import Event, EventWriter, WriteResult
from rerank.store.keys import DEFAULT_PREFIX, Keys
from rerank.store.layout import ITEM_RECORD, NO_ITEM, STAT_FIELDS, decode_seq

if TYPE_CHECKING:
    from rerank.data.dataset import Dataset


@dataclass
class UserFeatures:
    """What the store knows about one user, and about the request's candidates."""

    user_id: str
    history: np.ndarray  # (L,) int32 item_idx, oldest -> newest
    history_types: np.ndarray  # (L,) int8 EVENT_CODE
    history_ts: np.ndarray  # (L,) float64 Unix seconds
    purchased: np.ndarray  # (P,) int32 item_idx, sorted
    last_event_ts: float | None
    candidates: np.ndarray | None  # (C,) int32 item_idx, 0 = unknown item
    candidate_stats: np.ndarray | None  # (C, 4) int64 views, clicks, carts, purchases
    feature_age_ms: float | None  # now - last_event_ts


class FeatureStore:
    """Client of the Redis feature store; thread-safe (one connection pool)."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, max_history: int = 200, **config) -> None:
        self.url = url
        self.config = FeatureStoreConfig(prefix=prefix, max_history=max_history, **config)
        self.keys = Keys(self.config.prefix)
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=self.config.socket_timeout_s,
            socket_connect_timeout=self.config.connect_timeout_s,
            retry=Retry(NoBackoff(), self.config.retries),
            retry_on_timeout=True,
        )
        self._writer = EventWriter(self._redis, self.keys, self.config, url)

    # Ray and multiprocessing pickle deployments' state: rebuild the client on the other side.
    def __getstate__(self) -> dict:
        return {"url": self.url, "config": self.config}

    def __setstate__(self, state: dict) -> None:
        cfg = dict(vars(state["config"]))
        self.__init__(state["url"], **cfg)

    def close(self) -> None:
        self._redis.close()

    def ping(self) -> bool:
        """True when Redis answers; never raises."""
        try:
            return bool(self._redis.ping())
        except UNAVAILABLE + (redis.RedisError,):
            return False

    def _unavailable(self, err: Exception, what: str) -> FeatureStoreUnavailable:
        return unavailable(self.url, err, what)

    # ---- reads -------------------------------------------------------------------------------

    def fetch(self, requests: list[tuple[str, list[str] | None]], history_len: int = 50,
              item_cache=None) -> list[UserFeatures]:
        """Features for each (user_id, candidate item ids or None), in ONE pipelined round trip.

        `item_cache` (rerank.serving.item_cache.ItemCache, or anything with its `clock()`,
        `lookup(ids) -> (records, hit)` and `put(ids, records, read_at)`): candidates whose item
        record it holds fresh are not asked of Redis, and the records read are put back; the
        users' sequences and bought sets are always read. None: every candidate is read."""
        if history_len <= 0:
            raise ValueError(f"history_len must be > 0, got {history_len}")
        keys = self.keys
        all_candidates: list[str] = []
        for user_id, candidates in requests:
            if candidates is not None:
                all_candidates.extend(candidates)
        pipe = self._redis.pipeline(transaction=False)
        for user_id, _ in requests:
            pipe.lrange(keys.user_seq(user_id), 0, history_len - 1)
            pipe.zrange(keys.user_bought(user_id), 0, -1)
        cached = ask = None  # with a cache: its records, and the rows of all_candidates it lacks
        wanted = all_candidates
        if item_cache is not None and all_candidates:
            cached, hit = item_cache.lookup(all_candidates)
            ask = np.flatnonzero(~hit)
            wanted = [all_candidates[i] for i in ask.tolist()]
        # the same items in several requests of a batch (popular items, whole-catalogue lists)
        # are asked for once
        lookup, positions = wanted, None
        unique = dict.fromkeys(wanted)
        if len(unique) < 0.8 * len(wanted):
            lookup = list(unique)
            where = {item_id: i for i, item_id in enumerate(lookup)}
            positions = np.fromiter(map(where.__getitem__, wanted), dtype=np.int64, count=len(wanted))
        if lookup:
            pipe.hmget(keys.item_stats, lookup)
        read_at = item_cache.clock() if item_cache is not None else None  # before the read: ages are upper bounds
        try:
            replies = pipe.execute(raise_on_error=False)
            self._read_legacy_bought(replies, requests)
            failed = next((r for r in replies if isinstance(r, Exception)), None)
            if failed is not None:
                raise failed
        except UNAVAILABLE as err:
            raise self._unavailable(err, "fetch") from err
        except redis.ResponseError as err:
            if is_transient(err):
                raise self._unavailable(err, "fetch") from err
            raise FeatureStoreError(f"fetch: Redis refused the read: {err}") from err
        now = time.time()
        items = np.zeros(0, dtype=ITEM_RECORD)
        if lookup:
            records = replies[-1]
            items = np.frombuffer(b"".join([r if r is not None else NO_ITEM for r in records]), dtype=ITEM_RECORD)
            if item_cache is not None:
                item_cache.put(lookup, items, read_at)
            if positions is not None:
                items = items[positions]
        if cached is not None:
            np.put(cached, ask, items)  # (fancy assignment of structured rows is ~10x slower)
            items = cached
        out, offset = [], 0
        for i, (user_id, candidates) in enumerate(requests):
            seq = decode_seq(replies[2 * i])
            bought = replies[2 * i + 1]
            last_ts = float(seq["ts"].max()) if len(seq) else None
            cand_idx = cand_stats = None
            if candidates is not None:
                rec = items[offset : offset + len(candidates)]
                offset += len(candidates)
                cand_idx = rec["idx"].astype(np.int32)
                cand_stats = np.stack([rec[f].astype(np.int64) for f in STAT_FIELDS], axis=1).reshape(-1, 4)
            out.append(
                UserFeatures(
                    user_id=user_id,
                    history=seq["idx"].astype(np.int32),
                    history_types=seq["type"].astype(np.int8),
                    history_ts=seq["ts"].astype(np.float64),
                    purchased=np.sort(np.fromiter((int(b) for b in bought), dtype=np.int32, count=len(bought))),
                    last_event_ts=last_ts,
                    candidates=cand_idx,
                    candidate_stats=cand_stats,
                    feature_age_ms=None if last_ts is None else max(0.0, (now - last_ts) * 1000.0),
                )
            )
        return out

    def _read_legacy_bought(self, replies: list, requests: list[tuple[str, list[str] | None]]) -> None:
        """Bought sets written before they became capped sorted sets (plain sets: ZRANGE answers
        WRONGTYPE) are read with SMEMBERS instead, in place; the next purchase converts them."""
        legacy = [i for i in range(len(requests)) if isinstance(replies[2 * i + 1], redis.ResponseError)
                  and str(replies[2 * i + 1]).startswith("WRONGTYPE")]
        if not legacy:
            return
        pipe = self._redis.pipeline(transaction=False)
        for i in legacy:
            pipe.smembers(self.keys.user_bought(requests[i][0]))
        for i, members in zip(legacy, pipe.execute(raise_on_error=False)):
            replies[2 * i + 1] = members

    def item_index(self, item_ids: list[str]) -> np.ndarray:
        """(N,) int32 item_idx of each id, 0 for unknown ids."""
        if not item_ids:
            return np.zeros(0, dtype=np.int32)
        try:
            values = self._redis.hmget(self.keys.item_idx, item_ids)
        except UNAVAILABLE as err:
            raise self._unavailable(err, "item_index") from err
        return np.array([int(v) if v is not None else 0 for v in values], dtype=np.int32)

    def catalogue(self) -> tuple[np.ndarray, np.ndarray]:
        """(item_ids (n+1,) object, idx -> id, "" at 0 and at gaps; attributes (n+1, A) int32, 0-padded).

        n is the highest assigned item_idx, so items first seen in events are included
        (with no attributes)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self.keys.next_item_idx)
        pipe.hgetall(self.keys.item_id)
        pipe.hgetall(self.keys.item_attrs)
        try:
            top, ids, attrs = pipe.execute()
        except UNAVAILABLE as err:
            raise self._unavailable(err, "catalogue") from err
        n = max([int(top or 0)] + [int(k) for k in ids])
        item_ids = np.full(n + 1, "", dtype=object)
        for idx, item_id in ids.items():
            item_ids[int(idx)] = item_id.decode()
        parsed = {int(k): [int(a) for a in v.split(b",") if a] for k, v in attrs.items()}
        width = max([len(a) for a in parsed.values()] + [1])
        attributes = np.zeros((n + 1, width), dtype=np.int32)
        for idx, values in parsed.items():
            if idx <= n:
                attributes[idx, : len(values)] = values
        return item_ids, attributes

    def item_stats(self) -> np.ndarray:
        """(n+1, 4) int64 views/clicks/carts/purchases per item_idx over the whole catalogue."""
        try:
            records = self._redis.hvals(self.keys.item_stats)
        except UNAVAILABLE as err:
            raise self._unavailable(err, "item_stats") from err
        rec = np.frombuffer(b"".join(records), dtype=ITEM_RECORD) if records else np.zeros(0, ITEM_RECORD)
        n = int(rec["idx"].max()) if len(rec) else 0
        out = np.zeros((n + 1, 4), dtype=np.int64)
        for j, name in enumerate(STAT_FIELDS):
            out[rec["idx"], j] = rec[name]
        return out

    # ---- writes ------------------------------------------------------------------------------

    def write_events(self, events: list[Event]) -> list[bool]:
        """Apply events atomically one by one, all in ONE round trip; True = applied, False = duplicate.

        All events are validated first (EventValidationError, nothing written). Raises
        FeatureStoreUnavailable when Redis is unreachable; some events of the batch may
        then have been applied, and a retry with the same event_ids applies the rest once
        (events without an event_id get a server id and no idempotency marker).
        `write_events_detailed` also tells how many events were refused a new item.
        """
        return self.write_events_detailed(events).applied

    def write_events_detailed(self, events: list[Event]) -> WriteResult:
        """`write_events`, with counts of new items and of events over `item_capacity`.

        An event naming an item the store does not know yet, once `item_capacity` items
        exist, is still applied (counted in `applied`, its marker set, one stream entry with
        item_idx 0) but enters no history, bought set or item counter; `over_capacity`
        counts such events and `refused_item_ids` names their items.
        """
        return self._writer.write(events)

    def new_item_room(self) -> int | None:
        """How many more new items events may add before `item_capacity`; None = no capacity set."""
        return capacity.new_item_room(self._redis, self.keys, self.config.item_capacity, self.url)

    def ensure_item_floor(self, n_items: int) -> int:
        """Raise `next_item_idx` to at least `n_items` (atomic; never lowers it); returns its value.

        Call it at startup with the served model's item count: items first seen in events then
        get idx above the model's, also after Redis lost its data (an emptied Redis would
        otherwise hand out 1, 2, ... again, idx the model knows as other items). It does not
        restore the item map itself: items the model knows but Redis forgot get new idx when
        they reappear (bulk_load the catalogue to keep their idx)."""
        return capacity.ensure_item_floor(self._redis, self.keys, n_items, self.url)

    # ---- server checks -----------------------------------------------------------------------

    def server_memory(self) -> capacity.ServerMemory:
        """maxmemory, maxmemory-policy and used memory of the server.

        Reads CONFIG GET; where CONFIG is refused (managed Redis often renames or forbids it)
        falls back to INFO memory, which reports the same settings; where both are refused
        returns None fields with `error` set. Raises FeatureStoreUnavailable when Redis is
        unreachable."""
        return capacity.server_memory(self._redis, self.url)

    def check_server(self, full_fraction: float = 0.9, *, projection: capacity.MemoryProjection | None = None,
                     refuse: bool = False) -> list[str]:
        """Problems of the server's memory settings for this store, as sentences ([] = fine).

        Reported: an eviction policy other than noeviction (allkeys-* / volatile-* may drop user
        histories, the event stream, the item map or idempotency markers when Redis is full),
        maxmemory 0 (unbounded: Redis grows until the OS kills it), memory use at or above
        `full_fraction` of maxmemory, settings that could not be read (CONFIG and INFO both
        refused) -- a warning, not an error -- and, given a `projection` (`memory_projection()`),
        bounds that need more than `full_fraction` of maxmemory (with refuse=True that raises
        capacity.MemoryPlanError instead). Meant for startup logs; raises otherwise only
        FeatureStoreUnavailable (Redis unreachable)."""
        mem = self.server_memory()
        problems = capacity.check_server(mem, self.url, full_fraction)
        if projection is not None:
            problems += capacity.check_memory_plan(mem, projection, self.url, refuse=refuse, fraction=full_fraction)
        return problems

    def memory_projection(self, **expected) -> capacity.MemoryProjection:
        """capacity.project_memory of this store's config (expected_events_per_s, impressions_max_bytes,
        attribution_bytes, users, items as keywords)."""
        return capacity.project_memory(self.config, **expected)

    def bulk_load(self, dataset: "Dataset", progress: bool = True, batch: int = 5000, drop_last: int = 0) -> dict:
        """Load a dataset's catalogue, item counters and user histories (pipelined, idempotent).

        Sets (does not add to) every key it writes, so loading twice gives the same state;
        counters of loaded items are reset to the dataset's. Users' histories keep their last
        max_history events; `drop_last` leaves each user's last N events out (to replay them
        online). Historical events do not go to the event stream. Returns counts and seconds.
        """
        return _bulk_load.bulk_load(self._redis, self.keys, self.config, self.url, dataset, progress, batch, drop_last)

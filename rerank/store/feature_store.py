"""The online feature store: users' recent behaviour and item statistics in Redis.

Key schema (prefix `P`, default "rr:"; all keys of one store share it):

    P item_idx               hash   item_id -> item_idx (dense, 1..; never changes once assigned)
    P item_id                hash   item_idx -> item_id (the reverse mapping)
    P item_attrs             hash   item_idx -> "3,17,42" attribute ids (items from bulk_load)
    P item_stats             hash   item_id -> 28-byte record, little-endian struct "<iIIIId":
                                    item_idx, views, clicks, carts, purchases, last_ts
                                    (one HMGET per batch gives idx + counters for all candidates)
    P next_item_idx          string highest item_idx assigned so far; items first seen in events
                                    get the next one (up to `item_capacity` when set; beyond it
                                    they get idx 0: see "Bounded state"). An emptied Redis starts
                                    it at 0 again: `ensure_item_floor(model's n_items)` keeps new
                                    items clear of the idx the served model already uses
    P u:{user_id}:seq        list   the user's events, newest first, 13-byte records "<ibd":
                                    item_idx, event type code (1..4), ts; capped at max_history
                                    (LTRIM); TTL user_ttl_s, renewed on every event
    P u:{user_id}:bought     set    item_idx of purchased items; TTL user_ttl_s
    P evt:{event_id}         string idempotency marker, TTL event_ttl_s (7 days); ONLY for events
                                    whose client sent an event_id (an event without one gets a
                                    server uuid in the stream but no marker: nobody can retry it)
    P trainer:lease          string the online trainer's lease (rerank.store.lease; one trainer per stream)
    P sink:lease             string the Parquet sink's lease (rerank.eventlog.sink; one sink per stream)
    P events                 stream one entry per applied event (XADD MAXLEN ~ stream_maxlen):
                                    event_id, user_id, item_id, item_idx (0 = an item refused by
                                    item_capacity: not in any history or counter), type, ts, and
                                    seq = the user's recent "item_idx:type_code" pairs BEFORE
                                    this event, oldest first, space separated, at most
                                    stream_seq_len (see `parse_stream_seq`); plus the event's
                                    `extra` fields (attribution, rerank.eventlog.records) and `n`, the entry's
                                    number from `P events:n` (consecutive: a consumer that sees n jump
                                    knows how many entries MAXLEN trimmed before it read them)
    P events:n               string the events stream's sequence counter (INCR per entry)
    P impressions            stream one entry per /rank answer (rerank.experiments.attribution, rerank.eventlog.records)
    P u:{user_id}:imps       list   the user's recent request ids (at most recent_per_user),
                                    newest first; TTL = the window
    P u:{user_id}:shown      hash   what those answers showed, for attribution: one field per
                                    listed request id (rerank.experiments.attribution); TTL = the window
    P experiments            hash   the experiment book (rerank.experiments.book)

Binary records keep the hot read path to one HMGET/LRANGE per batch plus one
`np.frombuffer`; `decode_seq`/`ITEM_RECORD` document the layout for other readers.

Writes: each event is ONE Lua script (EVALSHA), atomic on the server: idempotency
check, idx assignment for new items, the user's sequence and bought set, item
counters, XADD. A batch of events is one pipelined round trip. A script touches
several keys, so on Redis Cluster all of them must share one hash slot (use a
prefix with a hash tag, e.g. "{rr}:", which puts the store on one node); the
store is meant for a single Redis node (with a replica for failover).

Bounded state: user keys expire (user_ttl_s), the stream is capped (stream_maxlen,
~0.5 KB an entry at stream_seq_len 50, so ~0.5 GB at the default cap; a consumer that falls
further behind than the cap loses the oldest entries, and the online trainer counts them from
the gaps in `n`: `events_trimmed_unapplied`, metric rerank_online_events_trimmed_unapplied), idempotency
markers exist only for client event_ids and expire (event_ttl_s; ~100 B each, so
200 events/s with ids for 7 days is ~120 M markers, ~12 GB: size event_ttl_s to the
retry window). The catalogue grows by one item per unseen item_id unless
`item_capacity` is set (and by at most `new_item_rate_per_min` a minute when that is set);
events naming a new item beyond either are still applied (stream entry with item_idx 0,
marker) but leave the user's history, bought set and item
counters alone; `write_events_detailed` counts them and `new_item_room()` tells what
is left. Redis itself should run with `maxmemory` and `maxmemory-policy noeviction`
(EmbeddedRedis does; `check_server()` reports an external server that does not): full,
it refuses writes with OOM (FeatureStoreUnavailable below) instead of evicting
histories, stream entries, the item map or idempotency markers.

Failures: socket timeouts are small (0.2 s by default) and a dead pooled connection is
retried once. An unreachable or timed-out server, or a transient error reply (OOM,
READONLY, LOADING, BUSY, ...), raises FeatureStoreUnavailable: serving degrades, the
event API answers with a retryable status. A write batch that failed that way may be
partly applied; retrying it with the same event_ids applies each event exactly once
(for event_ttl_s; events sent without an event_id have no such guarantee). Scripts do
all reads before the first write, and Redis refuses a script's first write (not later
ones) when out of memory, so an event is applied whole or not at all (short of a key of
the wrong type, which Redis cannot roll back).

Timestamps are Unix seconds (float). The sequence is in arrival order.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rerank.data.dataset import EVENT_CODE, EVENT_TYPES

if TYPE_CHECKING:
    from rerank.data.dataset import Dataset

DEFAULT_PREFIX = "rr:"  # every key of a store starts with its prefix (Keys below)
SEQ_RECORD = np.dtype([("idx", "<i4"), ("type", "i1"), ("ts", "<f8")])  # Lua struct "<ibd"
ITEM_RECORD = np.dtype(
    [("idx", "<i4"), ("views", "<u4"), ("clicks", "<u4"), ("carts", "<u4"), ("purchases", "<u4"), ("last_ts", "<f8")]
)  # Lua struct "<iIIIId"
STAT_FIELDS = ("views", "clicks", "carts", "purchases")  # candidate_stats columns, = EVENT_TYPES order
_NO_ITEM = bytes(ITEM_RECORD.itemsize)
MAX_ID_LENGTH = 512

_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)
# error replies of a server that is up but cannot take this now (out of memory, a read-only
# replica after failover, loading its data, a long script): retryable, like an outage
# (inside a script the reply reads "Error running script ...: @user_script: 28: -OOM ...")
_TRANSIENT_REPLY = re.compile(r"(?:^|: -)(OOM|READONLY|LOADING|BUSY|MASTERDOWN|TRYAGAIN|CLUSTERDOWN)\b")


def _is_transient(err: Exception) -> bool:
    # redis-py turns a command's own -OOM / -READONLY reply into these classes, minus the code
    if isinstance(err, (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)):
        return True
    return isinstance(err, redis.ResponseError) and _TRANSIENT_REPLY.search(str(err)) is not None

# KEYS: 1 evt marker, 2 item_idx, 3 item_id, 4 item_stats, 5 next_item_idx, 6 user seq, 7 user bought, 8 stream,
#       9 the stream's sequence counter (every entry gets n = its INCR: a reader sees trimmed entries as gaps),
#       10 this minute's count of new items (the new-item rate)
# ARGV: 1 event_id, 2 user_id, 3 item_id, 4 type code, 5 type name, 6 ts, 7 max_history, 8 user_ttl_s,
#       9 event_ttl_s, 10 stream_maxlen, 11 stream_seq_len, 12 item_capacity (0 = none),
#       13 "1" = the client sent event_id: check and set the marker KEYS[1]; "0" = a server id: no marker
#       14 new items allowed per minute (0 = no rate)
#       15.. extra stream fields as name, value pairs (attribution: rerank.eventlog.records.ATTRIBUTION_FIELDS)
# Returns 0 duplicate, else applied: 1 known item, 2 new item (got the next idx), 3 new item over
# item_capacity, 4 new item over the per-minute rate (3 and 4: idx 0, stream entry only).
# Reads first, writes last: Redis does not roll a script back, so nothing is written before
# the last point where it could fail.
_WRITE_EVENT_LUA = """
local keyed = ARGV[13] == '1'
if keyed and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local code = tonumber(ARGV[4])
local ts = tonumber(ARGV[6])
local idx = redis.call('HGET', KEYS[2], ARGV[3])
local new_item = false
local rate_limited = false
if idx then
  idx = tonumber(idx)
else
  local cap = tonumber(ARGV[12])
  local rate = tonumber(ARGV[14])
  idx = tonumber(redis.call('GET', KEYS[5]) or '0') + 1
  if cap > 0 and idx > cap then
    idx = 0
  elseif rate > 0 and tonumber(redis.call('GET', KEYS[10]) or '0') >= rate then
    idx = 0
    rate_limited = true
  else
    new_item = true
  end
end
local counts = {0, 0, 0, 0}
local last = 0
local rec = redis.call('HGET', KEYS[4], ARGV[3])
if rec and idx > 0 then
  local _
  _, counts[1], counts[2], counts[3], counts[4], last = struct.unpack('<iIIIId', rec)
end
local prev = redis.call('LRANGE', KEYS[6], 0, tonumber(ARGV[11]) - 1)
local parts = {}
for i = #prev, 1, -1 do
  local p_idx, p_type = struct.unpack('<ibd', prev[i])
  parts[#parts + 1] = p_idx .. ':' .. p_type
end
if new_item then
  redis.call('INCR', KEYS[10])
  redis.call('EXPIRE', KEYS[10], 120)
  redis.call('SET', KEYS[5], idx)
  redis.call('HSET', KEYS[2], ARGV[3], idx)
  redis.call('HSET', KEYS[3], idx, ARGV[3])
end
if idx > 0 then
  counts[code] = counts[code] + 1
  if ts > last then last = ts end
  redis.call('HSET', KEYS[4], ARGV[3], struct.pack('<iIIIId', idx, counts[1], counts[2], counts[3], counts[4], last))
  redis.call('LPUSH', KEYS[6], struct.pack('<ibd', idx, code, ts))
  redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[7]) - 1)
  redis.call('EXPIRE', KEYS[6], ARGV[8])
  if code == 4 then
    redis.call('SADD', KEYS[7], idx)
    redis.call('EXPIRE', KEYS[7], ARGV[8])
  end
end
local entry = {'event_id', ARGV[1], 'user_id', ARGV[2], 'item_id', ARGV[3], 'item_idx', tostring(idx),
  'type', ARGV[5], 'ts', ARGV[6], 'seq', table.concat(parts, ' ')}
for i = 15, #ARGV do entry[#entry + 1] = ARGV[i] end
entry[#entry + 1] = 'n'
entry[#entry + 1] = tostring(redis.call('INCR', KEYS[9]))
redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[10], '*', unpack(entry))
if keyed then redis.call('SET', KEYS[1], '1', 'EX', ARGV[9]) end
if new_item then return 2 end
if rate_limited then return 4 end
if idx == 0 then return 3 end
return 1
"""

# KEYS: 1 next_item_idx; ARGV: 1 floor. Raises next_item_idx to the floor (never lowers it); returns it.
_ITEM_FLOOR_LUA = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if cur < floor then
  redis.call('SET', KEYS[1], floor)
  return floor
end
return cur
"""


class FeatureStoreUnavailable(RuntimeError):
    """Redis is unreachable or timed out; callers degrade (ranking) or refuse with a retryable status."""


class FeatureStoreError(RuntimeError):
    """The store holds data that contradicts what is being loaded (e.g. an id mapped to another idx)."""


class EventValidationError(ValueError):
    """An event with a missing or malformed field; the message names the event and field."""


@dataclass
class Event:
    """One behaviour event from the shop."""

    user_id: str
    item_id: str
    type: str
    ts: float | None = None  # Unix seconds; None = now
    event_id: str | None = None  # idempotency key; None = a server uuid, no marker (a retry applies it twice)
    extra: dict[str, str] = field(default_factory=dict)  # more stream fields (attribution), stored as given


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


@dataclass
class WriteResult:
    """What one `write_events_detailed` call did."""

    applied: list[bool]  # per event: True = applied, False = duplicate (what write_events returns)
    new_items: int = 0  # applied events that assigned a new item_idx (the catalogue grew by this much)
    over_capacity: int = 0  # applied events naming a new item refused by item_capacity (stored with item_idx 0)
    over_rate: int = 0  # applied events naming a new item refused by new_item_rate_per_min (item_idx 0)
    refused_item_ids: list[str] = field(default_factory=list)  # items refused either way, distinct, in order


@dataclass(frozen=True)
class ServerMemory:
    """Memory settings of the Redis server (None = could not be read)."""

    maxmemory: int | None  # bytes; 0 = unbounded
    policy: str | None  # maxmemory-policy
    used_memory: int | None  # bytes, from INFO memory
    source: str  # "config" (CONFIG GET), "info" (INFO memory: CONFIG refused) or "none"
    error: str | None = None  # why CONFIG GET / INFO could not be read


@dataclass
class FeatureStoreConfig:
    """Key prefix, caps, TTLs and timeouts of a FeatureStore."""

    prefix: str = DEFAULT_PREFIX
    max_history: int = 200  # events kept per user
    user_ttl_s: int = 30 * 24 * 3600  # user keys expire after 30 days without events
    event_ttl_s: int = 7 * 24 * 3600  # how long a duplicate event_id is recognised
    stream_maxlen: int = 1_000_000  # approximate cap of the event stream
    stream_seq_len: int = 50  # pre-event history carried in each stream entry
    item_capacity: int | None = None  # highest item_idx the store may assign; None = no limit
    new_item_rate_per_min: int | None = None  # new items events may add per minute (per store); None = no rate
    socket_timeout_s: float = 0.2
    connect_timeout_s: float = 0.2
    retries: int = 1  # one reconnect attempt (e.g. a pooled socket that died in a restart)

    def __post_init__(self) -> None:
        for name in ("max_history", "user_ttl_s", "event_ttl_s", "stream_maxlen", "stream_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FeatureStoreConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.item_capacity is not None and self.item_capacity <= 0:
            raise ValueError(f"FeatureStoreConfig.item_capacity must be > 0 or None, got {self.item_capacity}")


@dataclass(frozen=True)
class Keys:
    """Key names for one prefix (see the module docstring)."""

    prefix: str = DEFAULT_PREFIX
    item_idx: str = field(init=False)
    item_id: str = field(init=False)
    item_attrs: str = field(init=False)
    item_stats: str = field(init=False)
    next_item_idx: str = field(init=False)
    events: str = field(init=False)
    events_seq: str = field(init=False)
    impressions: str = field(init=False)
    experiments: str = field(init=False)
    trainer_lease: str = field(init=False)
    sink_lease: str = field(init=False)

    def __post_init__(self) -> None:
        for name in ("item_idx", "item_id", "item_attrs", "item_stats", "next_item_idx", "events", "impressions",
                     "experiments"):
            object.__setattr__(self, name, self.prefix + name)
        object.__setattr__(self, "trainer_lease", self.prefix + "trainer:lease")
        object.__setattr__(self, "sink_lease", self.prefix + "sink:lease")
        object.__setattr__(self, "events_seq", self.prefix + "events:n")

    def arm_trainer_lease(self, experiment: str, arm: str) -> str:
        """The lease of an experiment arm's own online trainer."""
        return f"{self.prefix}trainer:lease:{experiment}:{arm}"

    def user_shown(self, user_id: str) -> str:
        """Hash of what the user's recent answers showed: request_id -> its shown list (rerank.experiments.attribution)."""
        return f"{self.prefix}u:{user_id}:shown"

    def user_impressions(self, user_id: str) -> str:
        """List of the user's recent request_ids, newest first (attribution by window)."""
        return f"{self.prefix}u:{user_id}:imps"

    def new_items(self, minute: int) -> str:
        """Count of new items admitted in one minute (the new-item rate), expiring after two."""
        return f"{self.prefix}new_items:{minute}"

    def user_seq(self, user_id: str) -> str:
        return f"{self.prefix}u:{user_id}:seq"

    def user_bought(self, user_id: str) -> str:
        return f"{self.prefix}u:{user_id}:bought"

    def event(self, event_id: str) -> str:
        return f"{self.prefix}evt:{event_id}"


def decode_seq(entries: list[bytes]) -> np.ndarray:
    """LRANGE of a user's seq key (newest first) -> SEQ_RECORD array, oldest -> newest."""
    if not entries:
        return np.zeros(0, dtype=SEQ_RECORD)
    return np.frombuffer(b"".join(entries), dtype=SEQ_RECORD)[::-1]


def parse_stream_seq(text: str) -> tuple[np.ndarray, np.ndarray]:
    """A stream entry's `seq` field "12:1 40:4" -> (item_idx int32, type codes int8), oldest first."""
    if not text:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int8)
    pairs = np.array(text.replace(":", " ").split(), dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0].astype(np.int32), pairs[:, 1].astype(np.int8)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_id(value, where: str, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise EventValidationError(f"{where}.{name}: expected a non-empty string, got {value!r}")
    if len(value) > MAX_ID_LENGTH:
        raise EventValidationError(f"{where}.{name}: longer than {MAX_ID_LENGTH} characters")
    return value


def validate_event(event: Event, where: str = "event", now: float | None = None) -> tuple[str, float]:
    """Check an event's fields; returns (event_id, ts) with defaults filled in."""
    _check_id(event.user_id, where, "user_id")
    _check_id(event.item_id, where, "item_id")
    if event.type not in EVENT_CODE:
        raise EventValidationError(f"{where}.type: {event.type!r} is not one of {'|'.join(EVENT_TYPES)}")
    event_id = str(uuid.uuid4()) if event.event_id is None else _check_id(event.event_id, where, "event_id")
    ts = (time.time() if now is None else now) if event.ts is None else event.ts
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise EventValidationError(f"{where}.ts: expected Unix seconds (a finite number >= 0), got {event.ts!r}")
    return event_id, float(ts)


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
        self._write_sha: str | None = None
        self._item_floor = self._redis.register_script(_ITEM_FLOOR_LUA)

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
        except _UNAVAILABLE + (redis.RedisError,):
            return False

    def _unavailable(self, err: Exception, what: str) -> FeatureStoreUnavailable:
        from rerank.infra.redact import redact, safe_url

        return FeatureStoreUnavailable(f"feature store at {safe_url(self.url)} unavailable during {what}: {redact(str(err))}")

    # ---- reads -------------------------------------------------------------------------------

    def fetch(self, requests: list[tuple[str, list[str] | None]], history_len: int = 50) -> list[UserFeatures]:
        """Features for each (user_id, candidate item ids or None), in ONE pipelined round trip."""
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
            pipe.smembers(keys.user_bought(user_id))
        # the same items in several requests of a batch (popular items, whole-catalogue lists)
        # are asked for once
        lookup, positions = all_candidates, None
        unique = dict.fromkeys(all_candidates)
        if len(unique) < 0.8 * len(all_candidates):
            lookup = list(unique)
            where = {item_id: i for i, item_id in enumerate(lookup)}
            positions = np.fromiter(map(where.__getitem__, all_candidates), dtype=np.int64, count=len(all_candidates))
        if lookup:
            pipe.hmget(keys.item_stats, lookup)
        try:
            replies = pipe.execute()
        except _UNAVAILABLE as err:
            raise self._unavailable(err, "fetch") from err
        except redis.ResponseError as err:
            if _is_transient(err):
                raise self._unavailable(err, "fetch") from err
            raise FeatureStoreError(f"fetch: Redis refused the read: {err}") from err
        now = time.time()
        items = np.zeros(0, dtype=ITEM_RECORD)
        if all_candidates:
            records = replies[-1]
            items = np.frombuffer(b"".join([r if r is not None else _NO_ITEM for r in records]), dtype=ITEM_RECORD)
            if positions is not None:
                items = items[positions]
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

    def item_index(self, item_ids: list[str]) -> np.ndarray:
        """(N,) int32 item_idx of each id, 0 for unknown ids."""
        if not item_ids:
            return np.zeros(0, dtype=np.int32)
        try:
            values = self._redis.hmget(self.keys.item_idx, item_ids)
        except _UNAVAILABLE as err:
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
        except _UNAVAILABLE as err:
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
        except _UNAVAILABLE as err:
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
        now = time.time()
        checked = [validate_event(e, f"events[{i}]", now) for i, e in enumerate(events)]
        if not events:
            return WriteResult(applied=[])
        cfg, keys = self.config, self.keys
        static_args = [cfg.max_history, cfg.user_ttl_s, cfg.event_ttl_s, cfg.stream_maxlen, cfg.stream_seq_len,
                       cfg.item_capacity or 0]  # fmt: skip
        for attempt in range(2):
            try:
                if self._write_sha is None:
                    self._write_sha = self._redis.script_load(_WRITE_EVENT_LUA)
                pipe = self._redis.pipeline(transaction=False)
                for event, (event_id, ts) in zip(events, checked):
                    pipe.evalsha(
                        self._write_sha,
                        10,
                        keys.event(event_id), keys.item_idx, keys.item_id, keys.item_stats, keys.next_item_idx,
                        keys.user_seq(event.user_id), keys.user_bought(event.user_id), keys.events, keys.events_seq,
                        keys.new_items(int(now // 60)),
                        event_id, event.user_id, event.item_id, EVENT_CODE[event.type], event.type, repr(ts),
                        *static_args, "0" if event.event_id is None else "1", cfg.new_item_rate_per_min or 0,
                        *(x for pair in event.extra.items() for x in pair),
                    )  # fmt: skip
                replies = pipe.execute(raise_on_error=False)
            except _UNAVAILABLE as err:
                raise self._unavailable(err, "write_events") from err
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies) and attempt == 0:
                self._write_sha = None  # the server restarted without its script cache: load and retry
                continue
            errors = [r for r in replies if isinstance(r, Exception)]
            transient = [r for r in errors if _is_transient(r)]
            if transient:
                raise self._unavailable(transient[0], "write_events")
            if errors:
                raise FeatureStoreError(f"write_events: Redis refused {len(errors)} event(s): {errors[0]}")
            codes = [int(r) for r in replies]
            refused = [e.item_id for e, c in zip(events, codes) if c in (3, 4)]
            return WriteResult(
                applied=[c > 0 for c in codes],
                new_items=codes.count(2),
                over_capacity=codes.count(3),
                over_rate=codes.count(4),
                refused_item_ids=list(dict.fromkeys(refused)),
            )
        raise FeatureStoreError("write_events: the event script could not be loaded")

    def new_item_room(self) -> int | None:
        """How many more new items events may add before `item_capacity`; None = no capacity set."""
        cap = self.config.item_capacity
        if cap is None:
            return None
        try:
            top = int(self._redis.get(self.keys.next_item_idx) or 0)
        except _UNAVAILABLE as err:
            raise self._unavailable(err, "new_item_room") from err
        return max(0, cap - top)

    def ensure_item_floor(self, n_items: int) -> int:
        """Raise `next_item_idx` to at least `n_items` (atomic; never lowers it); returns its value.

        Call it at startup with the served model's item count: items first seen in events then
        get idx above the model's, also after Redis lost its data (an emptied Redis would
        otherwise hand out 1, 2, ... again, idx the model knows as other items). It does not
        restore the item map itself: items the model knows but Redis forgot get new idx when
        they reappear (bulk_load the catalogue to keep their idx)."""
        if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 0:
            raise ValueError(f"ensure_item_floor: n_items must be an int >= 0, got {n_items!r}")
        try:
            return int(self._item_floor(keys=[self.keys.next_item_idx], args=[int(n_items)]))
        except _UNAVAILABLE as err:
            raise self._unavailable(err, "ensure_item_floor") from err
        except redis.ResponseError as err:
            if _is_transient(err):
                raise self._unavailable(err, "ensure_item_floor") from err
            raise FeatureStoreError(f"ensure_item_floor: Redis refused it: {err}") from err

    # ---- server checks -----------------------------------------------------------------------

    def server_memory(self) -> ServerMemory:
        """maxmemory, maxmemory-policy and used memory of the server.

        Reads CONFIG GET; where CONFIG is refused (managed Redis often renames or forbids it)
        falls back to INFO memory, which reports the same settings; where both are refused
        returns None fields with `error` set. Raises FeatureStoreUnavailable when Redis is
        unreachable."""
        errors: list[str] = []
        try:
            info = self._redis.info("memory")
        except _UNAVAILABLE as err:
            raise self._unavailable(err, "server_memory") from err
        except redis.ResponseError as err:
            info = {}
            errors.append(f"INFO memory: {err}")
        used = info.get("used_memory")
        used = int(used) if used is not None else None
        try:
            policy = self._redis.config_get("maxmemory-policy").get("maxmemory-policy")
            maxmemory = self._redis.config_get("maxmemory").get("maxmemory")
            if policy is not None and maxmemory is not None:
                return ServerMemory(int(maxmemory), _text(policy), used, "config")
            errors.append("CONFIG GET: maxmemory / maxmemory-policy not reported")
        except _UNAVAILABLE as err:
            raise self._unavailable(err, "server_memory") from err
        except redis.ResponseError as err:
            errors.append(f"CONFIG GET: {err}")
        if "maxmemory" in info and "maxmemory_policy" in info:
            policy = _text(info["maxmemory_policy"])
            return ServerMemory(int(info["maxmemory"]), policy, used, "info", "; ".join(errors))
        return ServerMemory(None, None, used, "none", "; ".join(errors))

    def check_server(self, full_fraction: float = 0.9) -> list[str]:
        """Problems of the server's memory settings for this store, as sentences ([] = fine).

        Reported: an eviction policy other than noeviction (allkeys-* / volatile-* may drop user
        histories, the event stream, the item map or idempotency markers when Redis is full),
        maxmemory 0 (unbounded: Redis grows until the OS kills it), memory use at or above
        `full_fraction` of maxmemory, and settings that could not be read (CONFIG and INFO both
        refused) -- a warning, not an error. Meant for startup logs; raises only
        FeatureStoreUnavailable (Redis unreachable)."""
        from rerank.infra.redact import safe_url

        mem = self.server_memory()
        where = f"Redis at {safe_url(self.url)}"
        if mem.source == "none":
            return [
                f"{where}: could not read maxmemory / maxmemory-policy ({mem.error}); make sure "
                "maxmemory is set and maxmemory-policy is noeviction"
            ]
        problems = []
        if mem.policy != "noeviction":
            problems.append(
                f"{where}: maxmemory-policy is {mem.policy!r}: when full, Redis evicts keys (user "
                "histories, the event stream, the item map, idempotency markers); set it to "
                "'noeviction' so a full Redis refuses writes (retryable) instead"
            )
        if mem.maxmemory == 0:
            problems.append(
                f"{where}: maxmemory is 0 (unbounded): Redis grows until the machine runs out of "
                "memory; set maxmemory (with maxmemory-policy noeviction)"
            )
        elif mem.used_memory is not None and mem.used_memory >= full_fraction * mem.maxmemory:
            problems.append(
                f"{where}: uses {mem.used_memory / 2**20:.1f} MiB of its maxmemory "
                f"{mem.maxmemory / 2**20:.1f} MiB ({mem.used_memory / mem.maxmemory:.0%}): "
                "writes will soon be refused (OOM)"
            )
        return problems

    def bulk_load(self, dataset: "Dataset", progress: bool = True, batch: int = 5000, drop_last: int = 0) -> dict:
        """Load a dataset's catalogue, item counters and user histories (pipelined, idempotent).

        Sets (does not add to) every key it writes, so loading twice gives the same state;
        counters of loaded items are reset to the dataset's. Users' histories keep their last
        max_history events; `drop_last` leaves each user's last N events out (to replay them
        online). Historical events do not go to the event stream. Returns counts and seconds.
        """
        from tqdm import tqdm

        if drop_last < 0:
            raise ValueError(f"drop_last must be >= 0, got {drop_last}")
        start = time.perf_counter()
        keys, cfg = self.keys, self.config
        item_ids = dataset.item_ids
        n_items = dataset.n_items
        try:
            position = {item_id: i for i, item_id in enumerate(item_ids) if i > 0}
            for item_id, idx in self._redis.hgetall(keys.item_idx).items():
                item_id, idx = item_id.decode(), int(idx)
                if position.get(item_id, 0) != idx and (item_id in position or idx <= n_items):
                    raise FeatureStoreError(
                        f"{keys.item_idx}: item {item_id!r} has idx {idx} in Redis but "
                        f"{position.get(item_id, 'none')} in {dataset.path}; flush the store "
                        f"(prefix {cfg.prefix!r}) before loading this dataset"
                    )
            seqs, types, stamps = dataset.sequences, dataset.event_type_sequences, dataset.timestamp_sequences
            kept = [slice(0, max(0, len(s) - drop_last)) for s in seqs]
            # item counters over the loaded events (events are sorted by user: keep a prefix of each)
            lengths = np.array([len(s) for s in seqs])
            start_of = np.repeat(np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
            keep = (np.arange(lengths.sum()) - start_of) < np.repeat(lengths - drop_last, lengths)
            ev_idx = np.concatenate(seqs)[keep].astype(np.int64)
            ev_type = np.concatenate(types)[keep].astype(np.int64)
            ev_ts = np.concatenate(stamps)[keep].astype(np.float64)
            counts = np.zeros((n_items + 1, 4), dtype=np.int64)
            np.add.at(counts, (ev_idx, ev_type - 1), 1)
            last_ts = np.zeros(n_items + 1, dtype=np.float64)
            np.maximum.at(last_ts, ev_idx, ev_ts)
            records = np.zeros(n_items + 1, dtype=ITEM_RECORD)
            records["idx"] = np.arange(n_items + 1)
            for j, name in enumerate(STAT_FIELDS):
                records[name] = counts[:, j]
            records["last_ts"] = last_ts
            attrs = dataset.item_attributes
            bar = tqdm(total=n_items + dataset.n_users, desc="feature store", unit="key", disable=not progress)
            for lo in range(1, n_items + 1, batch):
                hi = min(lo + batch, n_items + 1)
                pipe = self._redis.pipeline(transaction=False)
                pipe.hset(keys.item_idx, mapping={item_ids[i]: i for i in range(lo, hi)})
                pipe.hset(keys.item_id, mapping={i: item_ids[i] for i in range(lo, hi)})
                pipe.hset(keys.item_attrs, mapping={i: ",".join(map(str, attrs[i][attrs[i] > 0])) for i in range(lo, hi)})
                pipe.hset(keys.item_stats, mapping={item_ids[i]: records[i].tobytes() for i in range(lo, hi)})
                pipe.execute()
                bar.update(hi - lo)
            top = int(self._redis.get(keys.next_item_idx) or 0)
            if top < n_items:
                self._redis.set(keys.next_item_idx, n_items)
            user_ids = dataset.user_ids
            n_events = 0
            for lo in range(1, dataset.n_users + 1, batch):
                hi = min(lo + batch, dataset.n_users + 1)
                pipe = self._redis.pipeline(transaction=False)
                for u in range(lo, hi):
                    seq_key, bought_key = keys.user_seq(user_ids[u]), keys.user_bought(user_ids[u])
                    pipe.delete(seq_key, bought_key)
                    idx, typ, ts = seqs[u][kept[u]], types[u][kept[u]], stamps[u][kept[u]]
                    n_events += len(idx)
                    recent = slice(max(0, len(idx) - cfg.max_history), len(idx))
                    rec = np.zeros(len(idx[recent]), dtype=SEQ_RECORD)
                    rec["idx"], rec["type"], rec["ts"] = idx[recent], typ[recent], ts[recent]
                    raw = rec[::-1].tobytes()
                    size = SEQ_RECORD.itemsize
                    if len(rec):
                        pipe.rpush(seq_key, *[raw[i : i + size] for i in range(0, len(raw), size)])
                        pipe.expire(seq_key, cfg.user_ttl_s)
                    bought = np.unique(idx[typ == EVENT_CODE["purchase"]])
                    if len(bought):
                        pipe.sadd(bought_key, *bought.tolist())
                        pipe.expire(bought_key, cfg.user_ttl_s)
                pipe.execute()
                bar.update(hi - lo)
            bar.close()
        except _UNAVAILABLE as err:
            raise self._unavailable(err, "bulk_load") from err
        return {
            "users": dataset.n_users,
            "items": n_items,
            "events": n_events,
            "seconds": round(time.perf_counter() - start, 3),
        }

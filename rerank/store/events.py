"""The event write path: Event, its validation, and the one Lua script that applies an event.

Each event is ONE script call (EVALSHA), atomic on the server: idempotency check, idx assignment
for new items, the user's sequence and bought set, item counters, XADD of the stream entry
(fields: rerank.store.entry). A batch of events is one pipelined round trip. A script touches
several keys, so on Redis Cluster all of them must share one hash slot (use a prefix with a hash
tag, e.g. "{rr}:", which puts the store on one node); the store is meant for a single Redis node
(with a replica for failover).

A write batch that failed with FeatureStoreUnavailable may be partly applied; retrying it with the
same event_ids applies each event exactly once (for event_ttl_s; events sent without an event_id
have no such guarantee). The script does all reads before the first write, and Redis refuses a
script's first write (not later ones) when out of memory, so an event is applied whole or not at
all (short of a key of the wrong type, which Redis cannot roll back).

Bounded per user: the sequence at max_history records (LTRIM), the bought set at the max_bought most
recent purchases: a sorted set item_idx -> ts of its latest purchase, trimmed by rank (a store
written before the cap has plain sets: the script converts one on the user's next purchase, and
FeatureStore.fetch reads either). Ids (user, item, event) are at most MAX_ID_LENGTH characters: the
one bound the HTTP API (rerank.serving.api) validates too.

The script's KEYS and ARGV are named (WRITE_EVENT.keys / .args, rerank.store.lua): the Lua text
and the call are both built from those names, and the entry's field list from rerank.store.entry.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field

import redis

from rerank.data.dataset import EVENT_CODE, EVENT_TYPES
from rerank.store import entry
from rerank.store.config import FeatureStoreConfig
from rerank.store.errors import UNAVAILABLE, EventValidationError, FeatureStoreError, is_transient, unavailable
from rerank.store.keys import Keys
from rerank.store.layout import ITEM_STRUCT, SEQ_STRUCT
from rerank.store.lua import LuaScript

# Characters of a user, item or event id, here and in the HTTP API (rerank.serving.api imports it): what
# bounds the bytes of everything stored per id (histories, stream entries, impressions, attribution).
MAX_ID_LENGTH = 256


@dataclass
class Event:
    """One behaviour event from the shop."""

    user_id: str
    item_id: str
    type: str
    ts: float | None = None  # Unix seconds; None = now
    event_id: str | None = None  # idempotency key; None = a server uuid, no marker (a retry applies it twice)
    extra: dict[str, str] = field(default_factory=dict)  # more stream fields (attribution), stored as given
    marker_scope: str = ""  # the namespace of its idempotency marker (a tenant); the entry keeps event_id as sent


def marker_id(event_id: str, scope: str = "") -> str:
    """The id an idempotency marker is keyed by: `event_id` within `scope` ("" = the shared namespace),
    length-prefixed so no scope/id pair can spell another's."""
    return f"{len(scope)}:{scope}:{event_id}" if scope else event_id


@dataclass
class WriteResult:
    """What one `write_events_detailed` call did."""

    applied: list[bool]  # per event: True = applied, False = duplicate (what write_events returns)
    new_items: int = 0  # applied events that assigned a new item_idx (the catalogue grew by this much)
    over_capacity: int = 0  # applied events naming a new item refused by item_capacity (stored with item_idx 0)
    over_rate: int = 0  # applied events naming a new item refused by new_item_rate_per_min (item_idx 0)
    refused_item_ids: list[str] = field(default_factory=list)  # items refused either way, distinct, in order


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


WRITE_KEYS = (
    "marker",  # Keys.event(event_id): the idempotency marker
    "item_idx", "item_id", "item_stats", "next_item_idx",
    "user_seq", "user_bought",  # the user's
    "stream",  # Keys.events
    "stream_n",  # Keys.events_seq: every entry gets n = its INCR (a reader sees trimmed entries as gaps)
    "new_items",  # Keys.new_items(this minute): the count of new items (the new-item rate)
)  # fmt: skip
WRITE_ARGS = (
    "event_id", "user_id", "item_id",
    "type_code",  # EVENT_CODE of the type
    "type",  # its name
    "ts",  # repr(float)
    "max_history", "user_ttl_s", "event_ttl_s", "stream_maxlen", "stream_seq_len",
    "max_bought",  # purchases kept in the user's bought set (the most recent)
    "item_capacity",  # 0 = none
    "keyed",  # "1" = the client sent event_id: check and set the marker; "0" = a server id: no marker
    "new_item_rate",  # new items allowed per minute (0 = no rate)
)  # fmt: skip
# after WRITE_ARGS: the extra stream fields as name, value pairs (entry.ATTRIBUTION_FIELDS)

# The stream entry's first fields (entry.EVENT_FIELDS, in that order) and their Lua values.
_ENTRY_VALUES = {
    entry.EVENT_ID: "ARGV.event_id", entry.USER_ID: "ARGV.user_id", entry.ITEM_ID: "ARGV.item_id",
    entry.ITEM_IDX: "tostring(idx)", entry.TYPE: "ARGV.type", entry.TS: "ARGV.ts",
    entry.SEQ: "table.concat(parts, ' ')",
}  # fmt: skip


def _lua_entry_fields() -> str:
    if set(_ENTRY_VALUES) != set(entry.EVENT_FIELDS):
        raise AssertionError(f"the script's entry fields {list(_ENTRY_VALUES)} are not entry.EVENT_FIELDS")
    for name in entry.FIELDS:
        if not re.fullmatch(r"[a-z_]+", name):
            raise AssertionError(f"stream field {name!r} cannot be a bare Lua string")
    return ", ".join(f"'{name}', {_ENTRY_VALUES[name]}" for name in entry.EVENT_FIELDS)


# Returns 0 duplicate, else applied: 1 known item, 2 new item (got the next idx), 3 new item over
# item_capacity, 4 new item over the per-minute rate (3 and 4: idx 0, stream entry only).
# Reads first, writes last: Redis does not roll a script back, so nothing is written before
# the last point where it could fail.
_WRITE_EVENT_TEMPLATE = """
local keyed = ARGV.keyed == '1'
if keyed and redis.call('EXISTS', KEYS.marker) == 1 then return 0 end
local code = tonumber(ARGV.type_code)
local ts = tonumber(ARGV.ts)
local idx = redis.call('HGET', KEYS.item_idx, ARGV.item_id)
local new_item = false
local rate_limited = false
if idx then
  idx = tonumber(idx)
else
  local cap = tonumber(ARGV.item_capacity)
  local rate = tonumber(ARGV.new_item_rate)
  idx = tonumber(redis.call('GET', KEYS.next_item_idx) or '0') + 1
  if cap > 0 and idx > cap then
    idx = 0
  elseif rate > 0 and tonumber(redis.call('GET', KEYS.new_items) or '0') >= rate then
    idx = 0
    rate_limited = true
  else
    new_item = true
  end
end
local counts = {0, 0, 0, 0}
local last = 0
local rec = redis.call('HGET', KEYS.item_stats, ARGV.item_id)
if rec and idx > 0 then
  local _
  _, counts[1], counts[2], counts[3], counts[4], last = struct.unpack('$ITEM_STRUCT', rec)
end
local legacy_bought = nil  -- a bought set from before the cap (a plain set): converted below
if code == $PURCHASE and idx > 0 and redis.call('TYPE', KEYS.user_bought)['ok'] == 'set' then
  legacy_bought = redis.call('SMEMBERS', KEYS.user_bought)
end
local prev = redis.call('LRANGE', KEYS.user_seq, 0, tonumber(ARGV.stream_seq_len) - 1)
local parts = {}
for i = #prev, 1, -1 do
  local p_idx, p_type = struct.unpack('$SEQ_STRUCT', prev[i])
  parts[#parts + 1] = p_idx .. ':' .. p_type
end
if new_item then
  redis.call('INCR', KEYS.new_items)
  redis.call('EXPIRE', KEYS.new_items, 120)
  redis.call('SET', KEYS.next_item_idx, idx)
  redis.call('HSET', KEYS.item_idx, ARGV.item_id, idx)
  redis.call('HSET', KEYS.item_id, idx, ARGV.item_id)
end
if idx > 0 then
  counts[code] = counts[code] + 1
  if ts > last then last = ts end
  redis.call('HSET', KEYS.item_stats, ARGV.item_id, struct.pack('$ITEM_STRUCT', idx, counts[1], counts[2], counts[3], counts[4], last))
  redis.call('LPUSH', KEYS.user_seq, struct.pack('$SEQ_STRUCT', idx, code, ts))
  redis.call('LTRIM', KEYS.user_seq, 0, tonumber(ARGV.max_history) - 1)
  redis.call('EXPIRE', KEYS.user_seq, ARGV.user_ttl_s)
  if code == $PURCHASE then
    if legacy_bought then
      redis.call('DEL', KEYS.user_bought)
      for i = 1, #legacy_bought, 1000 do  -- their purchase times are unknown: the oldest
        local chunk = {}
        for j = i, math.min(i + 999, #legacy_bought) do
          chunk[#chunk + 1] = 0
          chunk[#chunk + 1] = legacy_bought[j]
        end
        redis.call('ZADD', KEYS.user_bought, unpack(chunk))
      end
    end
    redis.call('ZADD', KEYS.user_bought, 'GT', ts, idx)  -- a re-purchase moves it up, an older ts never down
    redis.call('ZREMRANGEBYRANK', KEYS.user_bought, 0, -tonumber(ARGV.max_bought) - 1)
    redis.call('EXPIRE', KEYS.user_bought, ARGV.user_ttl_s)
  end
end
local entry = {$ENTRY_FIELDS}
for i = $FIRST_EXTRA, #ARGV do entry[#entry + 1] = ARGV[i] end
entry[#entry + 1] = '$NUMBER'
entry[#entry + 1] = tostring(redis.call('INCR', KEYS.stream_n))
redis.call('XADD', KEYS.stream, 'MAXLEN', '~', ARGV.stream_maxlen, '*', unpack(entry))
if keyed then redis.call('SET', KEYS.marker, '1', 'EX', ARGV.event_ttl_s) end
if new_item then return 2 end
if rate_limited then return 4 end
if idx == 0 then return 3 end
return 1
"""

WRITE_EVENT = LuaScript.render(
    _WRITE_EVENT_TEMPLATE, WRITE_KEYS, WRITE_ARGS, ITEM_STRUCT=ITEM_STRUCT, SEQ_STRUCT=SEQ_STRUCT,
    PURCHASE=EVENT_CODE["purchase"], ENTRY_FIELDS=_lua_entry_fields(), FIRST_EXTRA=len(WRITE_ARGS) + 1,
    NUMBER=entry.NUMBER,
)  # fmt: skip


class EventWriter:
    """Applies batches of events with the event script; one per client (it caches the script's sha)."""

    def __init__(self, client: redis.Redis, keys: Keys, config: FeatureStoreConfig, url: str) -> None:
        self.client, self.keys, self.config, self.url = client, keys, config, url
        self._sha: str | None = None

    def write(self, events: list[Event]) -> WriteResult:
        """FeatureStore.write_events_detailed (see there)."""
        now = time.time()
        checked = [validate_event(e, f"events[{i}]", now) for i, e in enumerate(events)]
        if not events:
            return WriteResult(applied=[])
        cfg, keys = self.config, self.keys
        shared_keys = {"item_idx": keys.item_idx, "item_id": keys.item_id, "item_stats": keys.item_stats,
                       "next_item_idx": keys.next_item_idx, "stream": keys.events, "stream_n": keys.events_seq,
                       "new_items": keys.new_items(int(now // 60))}
        shared_args = {"max_history": cfg.max_history, "user_ttl_s": cfg.user_ttl_s, "event_ttl_s": cfg.event_ttl_s,
                       "stream_maxlen": cfg.stream_maxlen, "stream_seq_len": cfg.stream_seq_len,
                       "max_bought": cfg.max_bought, "item_capacity": cfg.item_capacity or 0, "new_item_rate": cfg.new_item_rate_per_min or 0}
        calls = []
        for event, (event_id, ts) in zip(events, checked):
            script_keys, script_args = WRITE_EVENT.bind(
                {**shared_keys, "marker": keys.event(marker_id(event_id, event.marker_scope)), "user_seq": keys.user_seq(event.user_id),
                 "user_bought": keys.user_bought(event.user_id)},
                {**shared_args, "event_id": event_id, "user_id": event.user_id, "item_id": event.item_id,
                 "type_code": EVENT_CODE[event.type], "type": event.type, "ts": repr(ts),
                 "keyed": "0" if event.event_id is None else "1"},
            )
            extra = (x for pair in event.extra.items() for x in pair)
            calls.append((len(script_keys), *script_keys, *script_args, *extra))
        for attempt in range(2):
            try:
                if self._sha is None:
                    self._sha = self.client.script_load(WRITE_EVENT.text)
                pipe = self.client.pipeline(transaction=False)
                for call in calls:
                    pipe.evalsha(self._sha, *call)
                replies = pipe.execute(raise_on_error=False)
            except UNAVAILABLE as err:
                raise unavailable(self.url, err, "write_events") from err
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies) and attempt == 0:
                self._sha = None  # the server restarted without its script cache: load and retry
                continue
            errors = [r for r in replies if isinstance(r, Exception)]
            transient = [r for r in errors if is_transient(r)]
            if transient:
                raise unavailable(self.url, transient[0], "write_events")
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

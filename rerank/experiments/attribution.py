"""Impressions and attribution in Redis: what each /rank answer showed, and which answer a click
belongs to.

    record(impressions)   one pipelined round trip per ingress batch. Each impression is first cut
                          to what is stored (Impression.stored: its first max_impression_items items,
                          at most max_impression_bytes of them as JSON; `n_items` keeps the answer's
                          count, so a truncated one is marked). Then per impression one script
                          (RECORD, atomic: applied whole or, refused when Redis is out of memory,
                          not at all): XADD to `{P}impressions` and XDEL its oldest entries while
                          the stream holds more than impressions_max_bytes (entry bytes, counted in
                          `{P}impressions:bytes`) or more than impressions_maxlen entries; on the
                          user's three keys: LPUSH the request id to `{P}u:{user}:imps`
                          (newest first; a repeated id moves to the front), RPOP the ids past
                          recent_per_user and HDEL their fields from `{P}u:{user}:shown`, HSET the
                          new one's field `{request_id}` -> JSON [ts, experiment, arm, [item_id, ...],
                          [team, ...]] (items in position order; teams empty when none has one), and
                          keep the index `{P}u:{user}:seen`: item_id -> "{n}:{request_id}" + JSON
                          [position, team, ts, experiment, arm] (n = the request id's length in bytes,
                          so an evicted answer's fields are recognised by prefix, without decoding)
                          of the newest kept answer that showed it (an evicted answer's items leave
                          it unless a newer kept one showed them);
                          EXPIRE the three keys (window_s).
    attribute(events)     one pipelined round trip per /events call, one script per event costing
                          O(1) whatever the user was shown: HGET of the item in the user's index.
                          An event is matched to its impression by `request_id` (the item must be in
                          that impression of THAT user: the lookups are in the user's own keys) or,
                          without one or failing that, to the user's most recent impression within
                          window_s that showed the item (the index entry itself). The match gives
                          position, experiment, arm and team. A request_id that is not the index's
                          newest showing of the item (the item was shown again since) reads that one
                          stored answer (<= max_impression_bytes: a plain substring test first, JSON
                          decoded only when the item is in it).

Bounded in bytes:
- the impressions stream by impressions_max_bytes (exactly, in entry bytes: field names and values
  plus ENTRY_OVERHEAD_BYTES each; Redis' own memory for it is up to ~1.3x that, allocator size
  classes) and by impressions_maxlen entries, whichever is smaller. A sink that falls further behind
  loses the oldest entries (rerank.eventlog.sink counts them as trimmed).
- per user active within window_s: one list of at most recent_per_user ids, one hash with exactly
  their fields (each <= max_impression_bytes + ~100 B) and an index of at most recent_per_user x
  max_impression_items fields, all expiring window_s after the user's last impression:
  `AttributionConfig.user_state_bytes()` is that bound. So attribution state is at most
  (impressions recorded within window_s) x `impression_state_bytes()`, whatever the request rate.

Semantics kept from the list scan this replaced: "most recent" is the order of recording (a
repeated request id moves to the front); the window test is on the newest showing of the item, so
an older showing within the window is found only while no newer one exists (impressions are
recorded in time order, so a newer one is never older). Users whose answers were recorded before
the index existed get one at their next impression (a record rebuilds a missing index).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from rerank.store import entry
from rerank.store.keys import Keys
from rerank.store.lua import LuaScript
from rerank.eventlog.records import Impression

# Bytes an impressions-stream entry is counted at beyond its field names and values (the listpack's
# per-entry headers and the per-node rax and master-entry share, measured at 1-8 KB entries).
ENTRY_OVERHEAD_BYTES = 64
# Bytes of one index field beyond its item id: "32:{request_id}" and the JSON [position, team, ts,
# experiment, arm] with short names, plus the hash entry.
SHOWING_BYTES = 120


@dataclass
class AttributionConfig:
    window_s: float = 1800.0  # an impression can earn clicks for this long
    recent_per_user: int = 20  # impressions kept per user (the attribution index covers them)
    impressions_maxlen: int = 1_000_000  # entry cap of the impressions stream (a second bound)
    # byte budget of the impressions stream: at ~1-2 KB an answer (k = 20, short ids) it keeps
    # 130-260 k answers, at the largest stored answers (~8 KB) ~30 k
    impressions_max_bytes: int = 256 * 2**20
    # items of an answer stored (stream and attribution): attribution needs what was seen, and
    # clicks below position 100 are rare; k up to MAX_K is still answered, the rest is not stored
    max_impression_items: int = 100
    # bytes of the stored items (their JSON): 100 items of ids up to ~60 characters fit, longer ids
    # keep fewer (251-character ids: 29); bounds every stored answer whatever its ids
    max_impression_bytes: int = 8192

    def __post_init__(self) -> None:
        for name in ("window_s", "recent_per_user", "impressions_maxlen", "impressions_max_bytes",
                     "max_impression_items"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AttributionConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.max_impression_bytes < 1024:
            raise ValueError(f"AttributionConfig.max_impression_bytes must be >= 1024 (one item of the longest "
                             f"id fits), got {self.max_impression_bytes}")

    def impression_state_bytes(self) -> int:
        """Upper estimate of the attribution state one stored impression holds (its `shown` field and
        index entries), for memory projections."""
        return 2 * self.max_impression_bytes + self.max_impression_items * SHOWING_BYTES + 256

    def user_state_bytes(self) -> int:
        """Upper estimate of one user's attribution state (recent_per_user stored impressions)."""
        return self.recent_per_user * self.impression_state_bytes()


@dataclass(frozen=True)
class Attribution:
    """Where an event's item was shown: empty when it was not (found)."""

    request_id: str = ""
    position: int | None = None
    experiment: str = ""
    arm: str = ""
    team: str = ""
    how: str = ""  # "request_id" | "window" | ""

    def fields(self) -> dict[str, str]:
        """The event stream fields (rerank.store.entry.ATTRIBUTION_FIELDS minus value)."""
        return {entry.REQUEST_ID: self.request_id, entry.POSITION: "" if self.position is None else str(self.position),
                entry.EXPERIMENT: self.experiment, entry.ARM: self.arm, entry.TEAM: self.team,
                entry.ATTRIBUTED: self.how}


# After the named ARGV: the stream entry's field / value pairs (2 x ARGV.entry_fields values), then
# the impression's index entries as item_id, showing pairs (each item once, its first position).
# Returns the number of stream entries trimmed.
RECORD = LuaScript.render("""
local max_bytes, max_len, size = tonumber(ARGV.max_bytes), tonumber(ARGV.max_len), tonumber(ARGV.size)
local first_index = $FIRST_EXTRA + 2 * tonumber(ARGV.entry_fields)
-- the stream: append, then drop the oldest entries while over the byte budget or the entry cap
local n = redis.call('XLEN', KEYS.stream)
local total = 0
if n > 0 then total = tonumber(redis.call('GET', KEYS.bytes) or '0') end
redis.call('XADD', KEYS.stream, '*', unpack(ARGV, $FIRST_EXTRA, first_index - 1))
n, total = n + 1, total + size
local trimmed = 0
while n > 1 and (total > max_bytes or n > max_len) do
  local oldest = redis.call('XRANGE', KEYS.stream, '-', '+', 'COUNT', 1)[1]
  local bytes = tonumber(ARGV.overhead)
  for _, v in ipairs(oldest[2]) do bytes = bytes + #v end
  redis.call('XDEL', KEYS.stream, oldest[1])
  n, total, trimmed = n - 1, total - bytes, trimmed + 1
end
-- the count drifts only where others wrote or trimmed the stream: never below what is certain
if n == 1 or total < size then total = size end
redis.call('SET', KEYS.bytes, total)
-- the user's attribution state
local rid, keep, max_items = ARGV.request_id, tonumber(ARGV.keep), tonumber(ARGV.max_items)
local function owner(r) return #r .. ':' .. r end  -- the prefix of r's index values
local function rebuild()
  -- the index from the kept answers, oldest first so that the newest showing of an item wins
  redis.call('DEL', KEYS.seen)
  local rids = redis.call('LRANGE', KEYS.list, 0, -1)
  for k = #rids, 1, -1 do
    local raw = redis.call('HGET', KEYS.shown, rids[k])
    if raw then
      local m = cjson.decode(raw)
      local pairs_, done = {}, {}
      for i, item in ipairs(m[4]) do
        if i > max_items then break end
        if not done[item] then
          done[item] = true
          pairs_[#pairs_ + 1] = item
          pairs_[#pairs_ + 1] = owner(rids[k]) .. cjson.encode({i, m[5][i] or '', m[1], m[2], m[3]})
        end
      end
      if #pairs_ > 0 then redis.call('HSET', KEYS.seen, unpack(pairs_)) end
    end
  end
end
local function forget(old)
  -- an evicted answer: its items leave the index where it is their newest showing
  local raw = redis.call('HGET', KEYS.shown, old)
  if not raw then return end
  local items = cjson.decode(raw)[4]
  if #items == 0 then return end
  local current = redis.call('HMGET', KEYS.seen, unpack(items))
  local prefix = owner(old)
  local gone = {}
  for i, v in ipairs(current) do
    if v and string.sub(v, 1, #prefix) == prefix then gone[#gone + 1] = items[i] end
  end
  if #gone > 0 then redis.call('HDEL', KEYS.seen, unpack(gone)) end
end
local again = redis.call('LREM', KEYS.list, 0, rid) > 0 or redis.call('HEXISTS', KEYS.shown, rid) == 1
local n = redis.call('LPUSH', KEYS.list, rid)
local gone = {}
while n > keep do
  gone[#gone + 1] = redis.call('RPOP', KEYS.list)
  n = n - 1
end
-- a repeated id (a retry) or an index missing for a user with answers: rebuilt below
local full = again or (n > 1 and redis.call('EXISTS', KEYS.seen) == 0)
if not full then
  for _, old in ipairs(gone) do forget(old) end
end
if #gone > 0 then redis.call('HDEL', KEYS.shown, unpack(gone)) end
redis.call('HSET', KEYS.shown, rid, ARGV.shown)
if redis.call('HLEN', KEYS.shown) > n then
  -- fields no list entry names (the list was lost or trimmed elsewhere): drop them, keep the bound
  local listed, stale = {}, {}
  for _, r in ipairs(redis.call('LRANGE', KEYS.list, 0, -1)) do listed[r] = true end
  for _, f in ipairs(redis.call('HKEYS', KEYS.shown)) do
    if not listed[f] then stale[#stale + 1] = f end
  end
  if #stale > 0 then redis.call('HDEL', KEYS.shown, unpack(stale)) end
  full = true
end
if not full and redis.call('HLEN', KEYS.seen) + (#ARGV - first_index + 1) / 2 > keep * max_items then
  full = true  -- more fields than the kept answers can have (written elsewhere): rebuilt, bounded again
end
if full then
  rebuild()
elseif #ARGV >= first_index then
  redis.call('HSET', KEYS.seen, unpack(ARGV, first_index))
end
redis.call('EXPIRE', KEYS.list, ARGV.ttl)
redis.call('EXPIRE', KEYS.shown, ARGV.ttl)
redis.call('EXPIRE', KEYS.seen, ARGV.ttl)
return trimmed
""", keys=("stream", "bytes", "list", "shown", "seen"),
    args=("max_bytes", "max_len", "size", "overhead", "entry_fields", "request_id", "shown", "keep", "ttl", "max_items"),
    FIRST_EXTRA=11)

# Returns {request_id, position, experiment, arm, team, how} or false.
ATTRIBUTE = LuaScript.render("""
local raw = redis.call('HGET', KEYS.seen, ARGV.item_id)
if not raw then return false end  -- no kept answer of this user showed the item
local oldest = tonumber(ARGV.oldest)
local colon = string.find(raw, ':', 1, true)
local n = tonumber(string.sub(raw, 1, colon - 1))
local shown_by = string.sub(raw, colon + 1, colon + n)
local s = cjson.decode(string.sub(raw, colon + n + 1))  -- {position, team, ts, experiment, arm}
if ARGV.request_id ~= '' then
  if shown_by == ARGV.request_id then
    if s[3] >= oldest then return {shown_by, s[1], s[4], s[5], s[2], 'request_id'} end
  else
    -- an older answer than the item's newest showing: that one answer, when it holds the item
    local rec = redis.call('HGET', KEYS.shown, ARGV.request_id)
    if rec and string.find(rec, ARGV.needle, 1, true) then
      local m = cjson.decode(rec)
      if m[1] >= oldest then
        for i, item in ipairs(m[4]) do
          if item == ARGV.item_id then return {ARGV.request_id, i, m[2], m[3], m[5][i] or '', 'request_id'} end
        end
      end
    end
  end
end
if s[3] >= oldest then return {shown_by, s[1], s[4], s[5], s[2], 'window'} end
return false
""", keys=("shown", "seen"), args=("request_id", "item_id", "oldest", "needle"))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def shown_value(imp: Impression) -> str:
    """The `{P}u:{user}:shown` field value of one impression: JSON [ts, experiment, arm, items, teams]."""
    teams = [team for _, _, team in imp.items]
    return _json([float(imp.ts), imp.experiment, imp.arm, [item_id for item_id, _, _ in imp.items],
                  teams if any(teams) else []])


def index_entries(imp: Impression) -> list[str]:
    """The impression's `{P}u:{user}:seen` fields, flat: item_id, "{n}:{request_id}" + JSON [position,
    team, ts, experiment, arm] (n: the request id's length in UTF-8 bytes); each item once (its first
    position)."""
    owner = f"{len(imp.request_id.encode())}:{imp.request_id}"
    out: list[str] = []
    done: set[str] = set()
    for position, (item_id, _, team) in enumerate(imp.items, start=1):
        if item_id not in done:
            done.add(item_id)
            out += [item_id, owner + _json([position, team, float(imp.ts), imp.experiment, imp.arm])]
    return out


def entry_bytes(fields: dict[str, str], overhead: int = ENTRY_OVERHEAD_BYTES) -> int:
    """What one impressions-stream entry counts against impressions_max_bytes (as RECORD counts it)."""
    return overhead + sum(len(k.encode()) + len(v.encode()) for k, v in fields.items())


def read_shown(client, keys: Keys, user_id: str, request_id: str) -> dict[str, tuple[int, str]] | None:
    """What one recorded impression of the user showed: item_id -> (position, team); None when the
    user has no such impression (never recorded, evicted or expired). For tests and debugging."""
    raw = client.hget(keys.user_shown(user_id), request_id)
    if raw is None:
        return None
    _, _, _, items, teams = json.loads(_text(raw))
    return {item_id: (pos, teams[pos - 1] if teams else "") for pos, item_id in enumerate(items, start=1)}


class ImpressionLog:
    """Records impressions and attributes events to them (one Redis round trip per call)."""

    def __init__(self, client, keys: Keys, config: AttributionConfig | None = None) -> None:
        self.client = client
        self.keys = keys
        self.config = config or AttributionConfig()
        self._record = client.register_script(RECORD.text)
        self._attribute = client.register_script(ATTRIBUTE.text)

    def record(self, impressions: list[Impression]) -> None:
        """Write a batch of impressions (stream + attribution index), each cut to what is stored;
        raises on Redis errors."""
        if not impressions:
            return
        cfg, keys = self.config, self.keys
        ttl, keep = max(1, int(cfg.window_s)), max(1, int(cfg.recent_per_user))
        pipe = self.client.pipeline(transaction=False)
        for imp in impressions:
            imp = imp.stored(cfg.max_impression_items, cfg.max_impression_bytes)
            fields = imp.to_fields()
            script_keys, script_args = RECORD.bind(
                {"stream": keys.impressions, "bytes": keys.impressions_bytes,
                 "list": keys.user_impressions(imp.user_id), "shown": keys.user_shown(imp.user_id),
                 "seen": keys.user_seen(imp.user_id)},
                {"max_bytes": cfg.impressions_max_bytes, "max_len": cfg.impressions_maxlen,
                 "size": entry_bytes(fields), "overhead": ENTRY_OVERHEAD_BYTES, "entry_fields": len(fields),
                 "request_id": imp.request_id, "shown": shown_value(imp), "keep": keep, "ttl": ttl,
                 "max_items": cfg.max_impression_items})
            entry_args = [x for pair in fields.items() for x in pair]
            self._record(keys=script_keys, args=script_args + entry_args + index_entries(imp), client=pipe)
        pipe.execute()

    def attribute(self, events: list[tuple[str, str, str | None]], now: float | None = None) -> list[Attribution]:
        """Attribution of each (user_id, item_id, request_id or None); raises on Redis errors."""
        if not events:
            return []
        oldest = repr((time.time() if now is None else now) - self.config.window_s)
        pipe = self.client.pipeline(transaction=False)
        for user_id, item_id, request_id in events:
            script_keys, script_args = ATTRIBUTE.bind(
                {"shown": self.keys.user_shown(user_id), "seen": self.keys.user_seen(user_id)},
                {"request_id": request_id or "", "item_id": item_id, "oldest": oldest, "needle": _json(item_id)})
            self._attribute(keys=script_keys, args=script_args, client=pipe)
        out = []
        for reply in pipe.execute():
            if not reply:
                out.append(Attribution())
                continue
            rid, position, exp, arm, team, how = reply
            out.append(Attribution(_text(rid), int(position), _text(exp), _text(arm), _text(team), _text(how)))
        return out

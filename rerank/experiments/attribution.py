"""Impressions and attribution in Redis: what each /rank answer showed, and which answer a click
belongs to.

    record(impressions)   one pipelined round trip per ingress batch: per impression an XADD to
                          `{P}impressions` (MAXLEN ~ impressions_maxlen) and one Lua script on the
                          user's two keys: LPUSH the request id to `{P}u:{user}:imps` (newest first;
                          a repeated id moves to the front), RPOP the ids past recent_per_user and
                          HDEL their fields from `{P}u:{user}:shown`, HSET the new one's field
                          `{request_id}` -> JSON [ts, experiment, arm, [item_id, ...], [team, ...]]
                          (items in position order; teams empty when none has one), EXPIRE both
                          keys (window_s).
    attribute(events)     one pipelined round trip per /events call: each event is matched to its
                          impression by `request_id` (the item must be in that impression of THAT
                          user: the lookup is in the user's own hash) or, without one or failing
                          that, to the user's most recent impression within window_s that showed
                          the item. The match gives position, experiment, arm and team.

Bounded like the users' other keys: the stream by MAXLEN; per user active within window_s one
list of at most recent_per_user ids and one hash with exactly their fields (an evicted id's field
goes with it), both expiring window_s after the user's last impression. So attribution state is
at most (users active within the window) x recent_per_user impressions, whatever the request rate.
One field a shown list (not one a shown item) keeps it at ~one small hash entry an impression.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from rerank.store import entry
from rerank.store.keys import Keys
from rerank.eventlog.records import Impression


@dataclass
class AttributionConfig:
    window_s: float = 1800.0  # an impression can earn clicks for this long
    recent_per_user: int = 20  # impressions kept per user (searched by window attribution)
    impressions_maxlen: int = 1_000_000  # ~0.5-1 KB an entry at k = 10..20


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


# KEYS: 1 the user's recent request ids (list), 2 the user's shown hash; ARGV: 1 request_id,
# 2 its field value (JSON), 3 recent_per_user, 4 TTL seconds.
_RECORD_LUA = """
local rid, keep = ARGV[1], tonumber(ARGV[3])
redis.call('LREM', KEYS[1], 0, rid)
local n = redis.call('LPUSH', KEYS[1], rid)
local gone = {}
while n > keep do
  gone[#gone + 1] = redis.call('RPOP', KEYS[1])
  n = n - 1
end
if #gone > 0 then redis.call('HDEL', KEYS[2], unpack(gone)) end
redis.call('HSET', KEYS[2], rid, ARGV[2])
if redis.call('HLEN', KEYS[2]) > n then
  -- fields no list entry names (the list was lost or trimmed elsewhere): drop them, keep the bound
  local listed, stale = {}, {}
  for _, r in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do listed[r] = true end
  for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
    if not listed[f] then stale[#stale + 1] = f end
  end
  if #stale > 0 then redis.call('HDEL', KEYS[2], unpack(stale)) end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return n
"""

# KEYS: 1 the user's recent request ids, 2 the user's shown hash; ARGV: 1 request_id ("" = none),
# 2 item_id, 3 oldest impression ts accepted. Returns {request_id, position, exp, arm, team, how} or false.
_ATTRIBUTE_LUA = """
local oldest = tonumber(ARGV[3])
local function lookup(rid, raw)
  if not raw then return nil end
  local m = cjson.decode(raw)
  if m[1] < oldest then return nil end
  for i, item in ipairs(m[4]) do
    if item == ARGV[2] then return {rid, i, m[2], m[3], m[5][i] or ''} end
  end
  return nil
end
if ARGV[1] ~= '' then
  local hit = lookup(ARGV[1], redis.call('HGET', KEYS[2], ARGV[1]))
  if hit then hit[6] = 'request_id'; return hit end
end
local rids = redis.call('LRANGE', KEYS[1], 0, -1)
if #rids == 0 then return false end
local raws = redis.call('HMGET', KEYS[2], unpack(rids))
for i, rid in ipairs(rids) do
  local hit = lookup(rid, raws[i])
  if hit then hit[6] = 'window'; return hit end
end
return false
"""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def shown_value(imp: Impression) -> str:
    """The `{P}u:{user}:shown` field value of one impression: JSON [ts, experiment, arm, items, teams]."""
    teams = [team for _, _, team in imp.items]
    return json.dumps([float(imp.ts), imp.experiment, imp.arm, [item_id for item_id, _, _ in imp.items],
                       teams if any(teams) else []], separators=(",", ":"), ensure_ascii=False)


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
        self._record = client.register_script(_RECORD_LUA)
        self._script = client.register_script(_ATTRIBUTE_LUA)

    def record(self, impressions: list[Impression]) -> None:
        """Write a batch of impressions (stream + attribution lookups); raises on Redis errors."""
        if not impressions:
            return
        cfg, keys = self.config, self.keys
        ttl, keep = max(1, int(cfg.window_s)), max(1, int(cfg.recent_per_user))
        pipe = self.client.pipeline(transaction=False)
        for imp in impressions:
            pipe.xadd(keys.impressions, imp.to_fields(), maxlen=cfg.impressions_maxlen, approximate=True)
            self._record(keys=[keys.user_impressions(imp.user_id), keys.user_shown(imp.user_id)],
                         args=[imp.request_id, shown_value(imp), keep, ttl], client=pipe)
        pipe.execute()

    def attribute(self, events: list[tuple[str, str, str | None]], now: float | None = None) -> list[Attribution]:
        """Attribution of each (user_id, item_id, request_id or None); raises on Redis errors."""
        if not events:
            return []
        oldest = repr((time.time() if now is None else now) - self.config.window_s)
        pipe = self.client.pipeline(transaction=False)
        for user_id, item_id, request_id in events:
            self._script(keys=[self.keys.user_impressions(user_id), self.keys.user_shown(user_id)],
                         args=[request_id or "", item_id, oldest], client=pipe)
        out = []
        for reply in pipe.execute():
            if not reply:
                out.append(Attribution())
                continue
            rid, position, exp, arm, team, how = reply
            out.append(Attribution(_text(rid), int(position), _text(exp), _text(arm), _text(team), _text(how)))
        return out

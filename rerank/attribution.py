"""Impressions and attribution in Redis: what each /rank answer showed, and which answer a click
belongs to.

    record(impressions)   one pipelined round trip per ingress batch: per impression an XADD to
                          `{P}impressions` (MAXLEN ~ impressions_maxlen), the hash `{P}imp:{request_id}`
                          (item_id -> "position|team", plus _user, _exp, _arm, _ts; TTL window_s) and
                          the user's recent request ids `{P}u:{user}:imps` (LPUSH, LTRIM to
                          recent_per_user, TTL window_s).
    attribute(events)     one pipelined round trip per /events call: each event is matched to its
                          impression by `request_id` (the item must be in it and the user must match)
                          or, without one, to the user's most recent impression within window_s that
                          showed the item. The match gives position, experiment, arm and team.

Bounded: the stream by MAXLEN, the hashes and lists by TTL and LTRIM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rerank.feature_store import Keys
from rerank.records import Impression


@dataclass
class AttributionConfig:
    window_s: float = 1800.0  # an impression can earn clicks for this long
    recent_per_user: int = 20  # impressions per user searched by window attribution
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
        """The event stream fields (rerank.records.ATTRIBUTION_FIELDS minus value)."""
        return {"request_id": self.request_id, "position": "" if self.position is None else str(self.position),
                "experiment": self.experiment, "arm": self.arm, "team": self.team, "attributed": self.how}


# KEYS: 1 the user's recent request ids; ARGV: 1 prefix, 2 request_id ("" = none), 3 user_id, 4 item_id,
# 5 oldest impression ts accepted. Returns {request_id, "position|team", exp, arm, how} or false.
_ATTRIBUTE_LUA = """
local function lookup(rid)
  local v = redis.call('HMGET', ARGV[1] .. 'imp:' .. rid, ARGV[4], '_user', '_exp', '_arm', '_ts')
  if v[1] and v[2] == ARGV[3] and tonumber(v[5]) >= tonumber(ARGV[5]) then return {rid, v[1], v[3], v[4]} end
  return nil
end
if ARGV[2] ~= '' then
  local hit = lookup(ARGV[2])
  if hit then hit[5] = 'request_id'; return hit end
end
for _, rid in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local hit = lookup(rid)
  if hit then hit[5] = 'window'; return hit end
end
return false
"""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ImpressionLog:
    """Records impressions and attributes events to them (one Redis round trip per call)."""

    def __init__(self, client, keys: Keys, config: AttributionConfig | None = None) -> None:
        self.client = client
        self.keys = keys
        self.config = config or AttributionConfig()
        self._script = client.register_script(_ATTRIBUTE_LUA)

    def record(self, impressions: list[Impression]) -> None:
        """Write a batch of impressions (stream + attribution lookups); raises on Redis errors."""
        if not impressions:
            return
        cfg, keys = self.config, self.keys
        ttl = max(1, int(cfg.window_s))
        pipe = self.client.pipeline(transaction=False)
        for imp in impressions:
            pipe.xadd(keys.impressions, imp.to_fields(), maxlen=cfg.impressions_maxlen, approximate=True)
            shown = {item_id: f"{pos}|{team}" for pos, (item_id, _, team) in enumerate(imp.items, start=1)}
            hash_key = keys.impression(imp.request_id)
            pipe.hset(hash_key, mapping={**shown, "_user": imp.user_id, "_exp": imp.experiment,
                                         "_arm": imp.arm, "_ts": repr(float(imp.ts))})
            pipe.expire(hash_key, ttl)
            recent = keys.user_impressions(imp.user_id)
            pipe.lpush(recent, imp.request_id)
            pipe.ltrim(recent, 0, cfg.recent_per_user - 1)
            pipe.expire(recent, ttl)
        pipe.execute()

    def attribute(self, events: list[tuple[str, str, str | None]], now: float | None = None) -> list[Attribution]:
        """Attribution of each (user_id, item_id, request_id or None); raises on Redis errors."""
        if not events:
            return []
        oldest = repr((time.time() if now is None else now) - self.config.window_s)
        pipe = self.client.pipeline(transaction=False)
        for user_id, item_id, request_id in events:
            self._script(keys=[self.keys.user_impressions(user_id)],
                         args=[self.keys.prefix, request_id or "", user_id, item_id, oldest], client=pipe)
        out = []
        for reply in pipe.execute():
            if not reply:
                out.append(Attribution())
                continue
            rid, shown, exp, arm, how = (_text(x) for x in reply)
            position, _, team = shown.partition("|")
            out.append(Attribution(rid, int(position), exp, arm, team, how))
        return out

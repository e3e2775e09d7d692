"""Room in the store: the item_idx space (new_item_room, ensure_item_floor), the server's memory
settings (server_memory, check_server) and the memory the configured bounds need (project_memory,
check_memory_plan, embedded_maxmemory).

Memory plan: every part of the store is bounded by a setting, so what it can hold is a sum
(`project_memory`): idempotency markers (expected events/s with an event_id x event_ttl_s x
MARKER_BYTES, `project_marker_bytes`), the event stream (stream_maxlen x event_entry_bytes), the
impressions stream (its byte budget, x STREAM_MEMORY_FACTOR for the allocator), attribution state
(impressions within the window x their bound) and, where the caller says how many, users'
histories and items. `check_memory_plan` compares it with the server's maxmemory and returns a
warning (or raises MemoryPlanError with refuse=True) when it cannot fit; `embedded_maxmemory` is
the maxmemory an embedded server should get for it.

Redis itself should run with `maxmemory` and `maxmemory-policy noeviction` (EmbeddedRedis does;
`check_server()` reports an external server that does not): full, it refuses writes with OOM
(FeatureStoreUnavailable) instead of evicting histories, stream entries, the item map or
idempotency markers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import redis

from rerank.store.config import FeatureStoreConfig
from rerank.store.errors import UNAVAILABLE, FeatureStoreError, is_transient, unavailable
from rerank.store.keys import Keys
from rerank.store.layout import SEQ_RECORD
from rerank.store.lua import LuaScript

# Redis used_memory per object, measured on Redis 6.2 (jemalloc) with uuid ids:
MARKER_BYTES = 125  # one idempotency marker `P evt:{uuid}` = "1" with a TTL
EVENT_ENTRY_BASE_BYTES = 150  # an event-stream entry without its seq (uuid event_id, short ids) ...
EVENT_SEQ_PAIR_BYTES = 9  # ... plus this per "item_idx:type" pair of seq (312 B measured at 25 on average)
USER_BASE_BYTES = 512  # a user's keys (sequence list, bought set) beyond their records
STREAM_MEMORY_FACTOR = 1.3  # used_memory of a stream / its entries' bytes (listpacks in allocator size classes)
MIB = 2**20
DEFAULT_EXPECTED_EVENTS_PER_S = 200.0  # events/s with an event_id a store is planned for (AppArgs' default)


class MemoryPlanError(FeatureStoreError):
    """The configured bounds need more memory than the server's maxmemory (check_memory_plan(refuse=True))."""

# Raises next_item_idx to the floor (never lowers it); returns it.
ITEM_FLOOR = LuaScript.render("""
local cur = tonumber(redis.call('GET', KEYS.next_item_idx) or '0')
local floor = tonumber(ARGV.floor)
if cur < floor then
  redis.call('SET', KEYS.next_item_idx, floor)
  return floor
end
return cur
""", keys=("next_item_idx",), args=("floor",))


@dataclass(frozen=True)
class ServerMemory:
    """Memory settings of the Redis server (None = could not be read)."""

    maxmemory: int | None  # bytes; 0 = unbounded
    policy: str | None  # maxmemory-policy
    used_memory: int | None  # bytes, from INFO memory
    source: str  # "config" (CONFIG GET), "info" (INFO memory: CONFIG refused) or "none"
    error: str | None = None  # why CONFIG GET / INFO could not be read


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def new_item_room(client: redis.Redis, keys: Keys, item_capacity: int | None, url: str) -> int | None:
    """FeatureStore.new_item_room (see there)."""
    if item_capacity is None:
        return None
    try:
        top = int(client.get(keys.next_item_idx) or 0)
    except UNAVAILABLE as err:
        raise unavailable(url, err, "new_item_room") from err
    return max(0, item_capacity - top)


def ensure_item_floor(client: redis.Redis, keys: Keys, n_items: int, url: str) -> int:
    """FeatureStore.ensure_item_floor (see there)."""
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 0:
        raise ValueError(f"ensure_item_floor: n_items must be an int >= 0, got {n_items!r}")
    script_keys, script_args = ITEM_FLOOR.bind({"next_item_idx": keys.next_item_idx}, {"floor": int(n_items)})
    try:
        return int(client.register_script(ITEM_FLOOR.text)(keys=script_keys, args=script_args))
    except UNAVAILABLE as err:
        raise unavailable(url, err, "ensure_item_floor") from err
    except redis.ResponseError as err:
        if is_transient(err):
            raise unavailable(url, err, "ensure_item_floor") from err
        raise FeatureStoreError(f"ensure_item_floor: Redis refused it: {err}") from err


def server_memory(client: redis.Redis, url: str) -> ServerMemory:
    """FeatureStore.server_memory (see there)."""
    errors: list[str] = []
    try:
        info = client.info("memory")
    except UNAVAILABLE as err:
        raise unavailable(url, err, "server_memory") from err
    except redis.ResponseError as err:
        info = {}
        errors.append(f"INFO memory: {err}")
    used = info.get("used_memory")
    used = int(used) if used is not None else None
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
        maxmemory = client.config_get("maxmemory").get("maxmemory")
        if policy is not None and maxmemory is not None:
            return ServerMemory(int(maxmemory), _text(policy), used, "config")
        errors.append("CONFIG GET: maxmemory / maxmemory-policy not reported")
    except UNAVAILABLE as err:
        raise unavailable(url, err, "server_memory") from err
    except redis.ResponseError as err:
        errors.append(f"CONFIG GET: {err}")
    if "maxmemory" in info and "maxmemory_policy" in info:
        policy = _text(info["maxmemory_policy"])
        return ServerMemory(int(info["maxmemory"]), policy, used, "info", "; ".join(errors))
    return ServerMemory(None, None, used, "none", "; ".join(errors))


def check_server(mem: ServerMemory, url: str, full_fraction: float = 0.9) -> list[str]:
    """FeatureStore.check_server (see there), from the server's `mem`."""
    from rerank.infra.redact import safe_url

    where = f"Redis at {safe_url(url)}"
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


# --- memory plan -------------------------------------------------------------------------------


def project_marker_bytes(events_per_s: float, event_ttl_s: float, bytes_per_marker: float = MARKER_BYTES) -> int:
    """Memory of the idempotency markers at a steady rate of events with an event_id: each lives
    event_ttl_s, so events_per_s x event_ttl_s of them exist at once."""
    for name, value in (("events_per_s", events_per_s), ("event_ttl_s", event_ttl_s),
                        ("bytes_per_marker", bytes_per_marker)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"project_marker_bytes: {name} must be a finite number >= 0, got {value!r}")
    return int(math.ceil(events_per_s * event_ttl_s * bytes_per_marker))


def event_entry_bytes(stream_seq_len: int) -> int:
    """Memory of one event-stream entry whose seq is full (stream_seq_len pairs)."""
    return EVENT_ENTRY_BASE_BYTES + EVENT_SEQ_PAIR_BYTES * stream_seq_len


def user_bytes(config: FeatureStoreConfig) -> int:
    """Memory of one user with a full history and a small bought set."""
    return USER_BASE_BYTES + config.max_history * (SEQ_RECORD.itemsize + 3)


@dataclass(frozen=True)
class MemoryProjection:
    """What the configured bounds let the store hold, by part (bytes), and how each was computed."""

    parts: dict[str, int]
    how: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return "; ".join(f"{name} {size / MIB:.0f} MiB" + (f" ({self.how[name]})" if name in self.how else "")
                         for name, size in self.parts.items())


def project_memory(config: FeatureStoreConfig, *, expected_events_per_s: float = DEFAULT_EXPECTED_EVENTS_PER_S,
                   impressions_max_bytes: int = 0, attribution_bytes: int = 0, users: int = 0,
                   items: int = 0) -> MemoryProjection:
    """The memory the store's bounds need at `expected_events_per_s` events with an event_id.

    impressions_max_bytes: the impressions stream's byte budget (AttributionConfig; 0 = none
    recorded); attribution_bytes: the attribution state the caller expects (e.g. impressions per s x
    window_s x AttributionConfig.impression_state_bytes()); users / items: how many users' histories
    and items to plan for (0 = leave them out)."""
    markers = project_marker_bytes(expected_events_per_s, config.event_ttl_s)
    entry = event_entry_bytes(config.stream_seq_len)
    parts = {"idempotency markers": markers, "event stream": config.stream_maxlen * entry}
    how = {"idempotency markers": f"{expected_events_per_s:g} events/s x event_ttl_s {config.event_ttl_s} s x "
                                  f"{MARKER_BYTES} B",
           "event stream": f"stream_maxlen {config.stream_maxlen} x {entry} B"}
    if impressions_max_bytes:
        parts["impressions stream"] = int(impressions_max_bytes * STREAM_MEMORY_FACTOR)
        how["impressions stream"] = f"impressions_max_bytes {impressions_max_bytes} x {STREAM_MEMORY_FACTOR}"
    if attribution_bytes:
        parts["attribution state"] = int(attribution_bytes)
    if users:
        parts["user histories"] = users * user_bytes(config)
        how["user histories"] = f"{users} users x {user_bytes(config)} B"
    if items:
        parts["items"] = items * 200
        how["items"] = f"{items} items x 200 B"
    return MemoryProjection(parts, how)


def check_memory_plan(mem: ServerMemory, projection: MemoryProjection, url: str, *, refuse: bool = False,
                      fraction: float = 0.9) -> list[str]:
    """A warning when the projection exceeds `fraction` of the server's maxmemory ([] when it fits or
    maxmemory is unknown or unbounded, which check_server reports). refuse=True raises MemoryPlanError
    instead of returning the warning."""
    from rerank.infra.redact import safe_url

    if not mem.maxmemory:
        return []
    if projection.total <= fraction * mem.maxmemory:
        return []
    problem = (
        f"Redis at {safe_url(url)}: the store's bounds need up to {projection.total / MIB:.0f} MiB "
        f"({projection.describe()}) but maxmemory is {mem.maxmemory / MIB:.0f} MiB: once they fill, Redis "
        "refuses every write (OOM). Lower event_ttl_s (to the clients' retry window) or the stream caps, "
        "or raise maxmemory"
    )
    if refuse:
        raise MemoryPlanError(problem)
    return [problem]


def embedded_maxmemory(projection: MemoryProjection, headroom: float = 1.25, minimum: int = 256 * MIB,
                       maximum: int | None = None) -> int:
    """The maxmemory (bytes, whole MiB) for an embedded Redis that must hold `projection`: its total
    x headroom (fragmentation, what the projection leaves out), at least `minimum`; above `maximum`
    (e.g. a share of the machine's memory) it raises MemoryPlanError naming the parts."""
    if not headroom >= 1:
        raise ValueError(f"headroom must be >= 1, got {headroom}")
    size = max(minimum, int(math.ceil(projection.total * headroom / MIB)) * MIB)
    if maximum is not None and size > maximum:
        raise MemoryPlanError(f"the store's bounds need maxmemory {size / MIB:.0f} MiB ({projection.describe()}), "
                              f"more than the {maximum / MIB:.0f} MiB allowed: lower event_ttl_s or the stream caps")
    return size

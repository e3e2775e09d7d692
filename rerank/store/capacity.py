"""Room in the store: the item_idx space (new_item_room, ensure_item_floor) and the server's memory
settings (server_memory, check_server).

Redis itself should run with `maxmemory` and `maxmemory-policy noeviction` (EmbeddedRedis does;
`check_server()` reports an external server that does not): full, it refuses writes with OOM
(FeatureStoreUnavailable) instead of evicting histories, stream entries, the item map or
idempotency markers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import redis

from rerank.store.errors import UNAVAILABLE, FeatureStoreError, is_transient, unavailable
from rerank.store.keys import Keys
from rerank.store.lua import LuaScript

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

"""How fresh the served weights are, for GET /model (`model_freshness`): age, lag behind the stream.

A version the online trainer published carries `trained_until` / `trained_until_id` in its
registry meta (rerank.online.loop); an offline version has neither and saw none of the stream.
"""

from __future__ import annotations

import time


def model_freshness(meta: dict, loaded_at: float | None, redis_url_or_client, stream_key: str,
                    now: float | None = None, limit: int = 10_000) -> dict:
    """Freshness of served weights for GET /model: version age, events behind the stream head, delay.

    `meta` is the version's registry meta (trained_until = Unix s of its newest event,
    trained_until_id its stream id). Never raises: fields it cannot compute are None.
    """
    import redis

    now = time.time() if now is None else now
    created = meta.get("created_at")
    newest = meta.get("trained_until")
    out = {
        "version_age_s": round(now - created, 3) if isinstance(created, (int, float)) else None,
        "serving_for_s": round(now - loaded_at, 3) if loaded_at else None,
        "newest_event_age_s": round(now - newest, 3) if isinstance(newest, (int, float)) else None,
        "newest_event_to_serving_s": (round(loaded_at - newest, 3)
                                      if loaded_at and isinstance(newest, (int, float)) else None),
        "events_behind_head": None,
        "stream_head_id": None,
        "trained_until_id": meta.get("trained_until_id"),
    }
    client = redis_url_or_client
    own = isinstance(client, str)
    try:
        if own:
            client = redis.Redis.from_url(client, socket_timeout=0.2, socket_connect_timeout=0.2,
                                          decode_responses=True)
        head = client.xrevrange(stream_key, count=1)
        head_id = head[0][0] if head else None
        out["stream_head_id"] = head_id.decode() if isinstance(head_id, bytes) else head_id
        since = meta.get("trained_until_id")  # None: an offline version, it saw none of the stream
        start = f"({since}" if since else "-"
        out["events_behind_head"] = len(client.xrange(stream_key, min=start, max="+", count=limit))
    except (redis.RedisError, OSError):
        pass
    finally:
        if own and not isinstance(client, str):
            client.close()
    return out

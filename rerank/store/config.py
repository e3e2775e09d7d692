"""FeatureStoreConfig: the key prefix, caps, TTLs and timeouts of one FeatureStore."""

from __future__ import annotations

from dataclasses import dataclass

from rerank.store.keys import DEFAULT_PREFIX


@dataclass
class FeatureStoreConfig:
    """Key prefix, caps, TTLs and timeouts of a FeatureStore."""

    prefix: str = DEFAULT_PREFIX
    max_history: int = 200  # events kept per user
    user_ttl_s: int = 30 * 24 * 3600  # user keys expire after 30 days without events
    # how long a duplicate event_id is recognised. Each marker is ~125 B of Redis memory for this long
    # (capacity.MARKER_BYTES), so markers hold events_per_s x event_ttl_s x 125 B (capacity.project_marker_bytes):
    # 6 h at 200 events/s is ~0.5 GB, 7 days would be ~15 GB (more than the embedded server's 2 GB).
    # Size it to the clients' retry window.
    event_ttl_s: int = 6 * 3600
    stream_maxlen: int = 1_000_000  # approximate cap of the event stream
    stream_seq_len: int = 50  # pre-event history carried in each stream entry
    max_bought: int = 500  # purchased items kept per user (the most recent; exclude_purchased drops them)
    item_capacity: int | None = None  # highest item_idx the store may assign; None = no limit
    new_item_rate_per_min: int | None = None  # new items events may add per minute (per store); None = no rate
    socket_timeout_s: float = 0.2
    connect_timeout_s: float = 0.2
    retries: int = 1  # one reconnect attempt (e.g. a pooled socket that died in a restart)

    def __post_init__(self) -> None:
        for name in ("max_history", "user_ttl_s", "event_ttl_s", "stream_maxlen", "stream_seq_len", "max_bought"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FeatureStoreConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.item_capacity is not None and self.item_capacity <= 0:
            raise ValueError(f"FeatureStoreConfig.item_capacity must be > 0 or None, got {self.item_capacity}")

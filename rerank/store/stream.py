"""Consumer-group client over the Redis event stream (`{prefix}events`, written by the feature store).

Delivery model (Redis Streams): XREADGROUP hands each entry to one consumer of the group and
keeps it in that consumer's pending list until XACK. So an entry is lost only if it is acked
before its effect is kept; the online trainer acks only entries whose effect is in a
published version / checkpoint. On (re)start `recover()` returns, in stream order,
the entries this consumer had read but not acked (XREADGROUP from id 0) and those
that other, dead consumers of the group left pending for longer than `claim_idle_ms`
(XAUTOCLAIM, Redis >= 6.2). Entries trimmed from the stream (MAXLEN) while pending come back
without fields; they are acked and counted in `trimmed` (they cannot be applied any more).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis


@dataclass
class StreamConfig:
    url: str
    stream: str  # the feature store's Keys(prefix).events
    group: str = "online-trainer"
    consumer: str = "trainer-1"
    block_ms: int = 200  # XREADGROUP BLOCK: how long a read waits for new entries
    claim_idle_ms: int = 10_000  # pending this long at another consumer = that consumer is dead
    socket_timeout_s: float = 5.0


@dataclass(frozen=True)
class StreamEntry:
    id: str  # "ms-seq"
    fields: dict[str, str]


def id_key(entry_id: str) -> tuple[int, int]:
    """Sortable key of a stream id "ms-seq"."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class EventStream:
    """Read / ack / reclaim entries of one stream as one consumer of one group."""

    config: StreamConfig
    trimmed: int = 0
    client: redis.Redis = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.client = redis.Redis.from_url(
            self.config.url, decode_responses=True, socket_timeout=self.config.socket_timeout_s
            + self.config.block_ms / 1000.0
        )

    def ensure_group(self, start_id: str = "0") -> None:
        """XGROUP CREATE ... MKSTREAM; an existing group is kept as it is."""
        try:
            self.client.xgroup_create(self.config.stream, self.config.group, id=start_id, mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def _entries(self, raw) -> list[StreamEntry]:
        out, dead = [], []
        for entry_id, fields in raw:
            if fields is None or not fields:  # trimmed while pending
                dead.append(entry_id)
            else:
                out.append(StreamEntry(entry_id, dict(fields)))
        if dead:
            self.ack(dead)
            self.trimmed += len(dead)
        return out

    def read(self, count: int = 256, block_ms: int | None = None) -> list[StreamEntry]:
        """New entries for this consumer (XREADGROUP >), waiting up to block_ms for the first."""
        block = self.config.block_ms if block_ms is None else block_ms
        reply = self.client.xreadgroup(
            self.config.group, self.config.consumer, {self.config.stream: ">"}, count=count, block=block or None
        )
        return self._entries(reply[0][1]) if reply else []

    def own_pending(self, count: int = 1000) -> list[StreamEntry]:
        """Entries this consumer read earlier and never acked (XREADGROUP from id 0)."""
        out: list[StreamEntry] = []
        start = "0"
        while True:
            reply = self.client.xreadgroup(
                self.config.group, self.config.consumer, {self.config.stream: start}, count=count
            )
            raw = reply[0][1] if reply else []
            if not raw:
                return out
            out.extend(self._entries(raw))
            start = raw[-1][0]

    def reclaim(self, min_idle_ms: int | None = None, count: int = 1000) -> list[StreamEntry]:
        """XAUTOCLAIM every entry pending at any consumer for longer than min_idle_ms."""
        idle = self.config.claim_idle_ms if min_idle_ms is None else min_idle_ms
        out: list[StreamEntry] = []
        start = "0-0"
        while True:
            reply = self.client.xautoclaim(
                self.config.stream, self.config.group, self.config.consumer, idle, start_id=start, count=count
            )
            start, raw = reply[0], reply[1]
            out.extend(self._entries(raw))
            if start in ("0-0", b"0-0"):
                return out

    def recover(self, min_idle_ms: int | None = None) -> list[StreamEntry]:
        """All entries to process again after a (re)start, in stream order, without duplicates."""
        entries = {e.id: e for e in self.own_pending()}
        for e in self.reclaim(min_idle_ms):
            entries[e.id] = e
        return sorted(entries.values(), key=lambda e: id_key(e.id))

    def ack(self, ids: list[str]) -> int:
        """XACK; returns how many were pending."""
        if not ids:
            return 0
        n = 0
        for i in range(0, len(ids), 1000):
            n += int(self.client.xack(self.config.stream, self.config.group, *ids[i : i + 1000]))
        return n

    def pending_count(self) -> int:
        """Entries delivered to some consumer of the group and not acked yet."""
        try:
            return int(self.client.xpending(self.config.stream, self.config.group)["pending"])
        except redis.ResponseError:
            return 0

    def head_id(self) -> str | None:
        """Id of the newest entry in the stream, or None when empty."""
        last = self.client.xrevrange(self.config.stream, count=1)
        return last[0][0] if last else None

    def behind(self, after_id: str | None, limit: int = 100_000) -> int:
        """How many entries the stream holds after `after_id` (capped at `limit`)."""
        start = "-" if not after_id else f"({after_id}"
        return len(self.client.xrange(self.config.stream, min=start, max="+", count=limit))

    def close(self) -> None:
        self.client.close()

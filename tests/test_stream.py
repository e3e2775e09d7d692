"""EventStream against a real Redis server: group reads, acks, and recovery after a consumer dies."""

from __future__ import annotations

import redis

from rerank.store.keys import Keys
from rerank.store.stream import EventStream, StreamConfig, id_key

STREAM = Keys().events  # the default store's events stream


def _add(url: str, n: int, stream: str = STREAM) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    ids = [client.xadd(stream, {"event_id": f"e{i}", "item_idx": str(i)}) for i in range(n)]
    client.close()
    return ids


def _stream(url: str, consumer: str, **kw) -> EventStream:
    s = EventStream(StreamConfig(url=url, stream=kw.pop("stream", STREAM), consumer=consumer, block_ms=50, **kw))
    s.ensure_group()
    return s


def test_read_ack_and_group_is_idempotent(redis_url):
    s = _stream(redis_url, "c1")
    s.ensure_group()  # second call keeps the group (BUSYGROUP swallowed)
    ids = _add(redis_url, 5)
    got = s.read(count=10)
    assert [e.id for e in got] == ids
    assert got[0].fields == {"event_id": "e0", "item_idx": "0"}
    assert s.pending_count() == 5
    assert s.ack([e.id for e in got[:3]]) == 3
    assert s.pending_count() == 2
    assert s.read(count=10) == []  # nothing new
    assert s.head_id() == ids[-1]
    assert s.behind(ids[1]) == 3
    assert s.behind(None) == 5


def test_restart_gets_own_unacked_entries_back(redis_url):
    s = _stream(redis_url, "c1")
    ids = _add(redis_url, 6)
    got = s.read(count=6)
    s.ack([got[0].id, got[2].id])
    s.close()
    again = _stream(redis_url, "c1")  # same consumer name after a restart
    assert [e.id for e in again.recover()] == [ids[1], ids[3], ids[4], ids[5]]


def test_reclaim_entries_of_a_dead_consumer(redis_url):
    dead = _stream(redis_url, "dead")
    ids = _add(redis_url, 8)
    assert len(dead.read(count=5)) == 5  # dies holding 5 unacked entries
    alive = _stream(redis_url, "alive")
    assert [e.id for e in alive.read(count=10)] == ids[5:]
    # not idle long enough yet: nothing is stolen from a live consumer
    assert alive.reclaim(min_idle_ms=60_000) == []
    recovered = alive.recover(min_idle_ms=0)
    # its own 3 pending entries and the dead one's 5, in stream order, each once
    assert [e.id for e in recovered] == ids
    assert sorted(recovered, key=lambda e: id_key(e.id)) == recovered
    alive.ack([e.id for e in recovered])
    assert alive.pending_count() == 0


def test_trimmed_pending_entries_are_acked_and_counted(redis_url):
    s = _stream(redis_url, "c1")
    _add(redis_url, 4)
    s.read(count=4)
    client = redis.Redis.from_url(redis_url)
    client.xtrim(STREAM, maxlen=1, approximate=False)
    client.close()
    again = _stream(redis_url, "c1")
    assert len(again.recover(min_idle_ms=0)) == 1
    assert again.trimmed == 3
    assert again.pending_count() == 1

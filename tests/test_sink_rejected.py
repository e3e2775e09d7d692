"""The sink's rejected-entries files are bounded in bytes: rotated once, never growing without end."""

from __future__ import annotations

import json

import redis

from rerank.eventlog.sink import SinkConfig, StreamSink
from rerank.store.keys import Keys


def test_rejected_files_rotate_at_their_byte_bound(redis_url, tmp_path):
    keys = Keys("rej:")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    bound = 4096
    sink = StreamSink(SinkConfig(redis_url=redis_url, prefix="rej:", out_dir=tmp_path, block_ms=0,
                                 rejected_max_bytes=bound))
    folder = tmp_path / "rejected"
    for rnd in range(30):  # each pass rejects a few unparseable events of ~300 bytes each
        for i in range(3):
            client.xadd(keys.events, {"event_id": f"e{rnd}-{i}", "user_id": "u", "item_id": "x" * 200,
                                      "item_idx": "not-a-number", "type": "click", "ts": "1700000000.0", "seq": ""})
        sink.run_once()
        sizes = [f.stat().st_size for f in folder.glob("events*.jsonl")]
        assert all(size <= bound for size in sizes), sizes
        assert len(sizes) <= 2
    assert sink.stats()["events"]["rejected"] == 90
    assert (folder / "events.1.jsonl").exists()  # the bound was reached and the file rotated
    newest = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert newest[-1]["fields"]["event_id"] == "e29-2"  # the newest rejections are kept

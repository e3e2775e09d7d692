"""rerank.eventlog.sink on a real Redis server: Parquet layout and schema, rejects, trims, retention, lag,
exactly-once across crashes (in-process between write and ack, and kill -9 of a subprocess), and the
single-sink lease (a second sink stands by; takeover on release, on expiry and mid-flush)."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis

from rerank.store.keys import Keys
from rerank.eventlog.records import EVENT_SCHEMA, IMPRESSION_SCHEMA, Impression
from rerank.eventlog.sink import SinkConfig, StreamSink
from rerank.store.stream import EventStream, StreamConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DAY1, DAY2 = "1700000000000", "1700090000000"  # 2023-11-14 and 2023-11-15 (UTC)


class SimulatedCrash(Exception):
    pass


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


def _impression(i: int) -> dict[str, str]:
    return Impression(request_id=f"r{i}", user_id=f"u{i % 7}", experiment="exp", arm="control",
                      model_version="v3", ts=1_700_000_000.5 + i,
                      items=[("i1", 0.9, ""), ("i2", float("nan"), "")]).to_fields()


def _event(i: int, **overrides: str) -> dict[str, str]:
    fields = {"event_id": f"e{i}", "user_id": f"u{i % 7}", "item_id": "i2", "item_idx": "2", "type": "click",
              "ts": str(1_700_000_000.25 + i), "seq": str(i), "request_id": f"r{i}", "position": "2",
              "experiment": "exp", "arm": "control", "team": "", "attributed": "request_id", "value": ""}
    return {**fields, **overrides}


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def _add(url: str, stream: str, entries: list[dict[str, str]], ids: list[str] | None = None) -> list[str]:
    client = _client(url)
    pipe = client.pipeline(transaction=False)
    for k, fields in enumerate(entries):
        pipe.xadd(stream, fields, id=ids[k] if ids else "*")
    out = pipe.execute()
    client.close()
    return out


def _config(url: str, prefix: str, out: Path, **kw) -> SinkConfig:
    return SinkConfig(redis_url=url, prefix=prefix, out_dir=out, block_ms=0, **kw)


def _files(out: Path, kind: str) -> list[Path]:
    return sorted((out / kind).glob("day=*/*.parquet"))


def _stream_ids(out: Path, kind: str) -> list[str]:
    return [sid for f in _files(out, kind) for sid in pq.read_table(f).column("stream_id").to_pylist()]


def _drain(sink: StreamSink, lease_wait_s: float = 10.0) -> dict[str, int]:
    """Passes until one (holding the lease) reads nothing; the summed counts per stream (written,
    skipped, ...). Waits up to lease_wait_s for another sink's lease to lapse."""
    total: dict[str, int] = collections.Counter()
    deadline = time.monotonic() + lease_wait_s
    while True:
        counts = sink.run_once()
        for stream, by_name in counts.items():
            total.update({f"{stream}.{name}": n for name, n in by_name.items()})
        if sink.standby:
            assert time.monotonic() < deadline, "another sink kept the lease"
            time.sleep(0.02)
            continue
        if not any(sum(by_name.values()) for by_name in counts.values()):
            return dict(total)


def _lease_lapses(url: str, prefix: str) -> None:
    """A crashed sink never renews its lease: it lapses after its TTL (here at once)."""
    client = _client(url)
    client.delete(Keys(prefix).sink_lease)
    client.close()


def _pending(url: str, stream: str, group: str = "sink") -> int:
    client = _client(url)
    n = client.xpending(stream, group)["pending"]
    client.close()
    return n


def test_both_streams_go_to_day_partitions_with_the_records_schema(redis_url, tmp_path):
    prefix = _prefix()
    keys = Keys(prefix)
    imp_ids = _add(redis_url, keys.impressions, [_impression(i) for i in range(3)],
                   [f"{DAY1}-0", f"{DAY1}-1", f"{DAY2}-0"])
    evt_ids = _add(redis_url, keys.events, [_event(0), _event(1, request_id="", position="", attributed="",
                                                                  type="purchase", value="12.5")],
                   [f"{DAY1}-5", f"{DAY2}-7"])
    sink = StreamSink(_config(redis_url, prefix, tmp_path))
    counts = sink.run_once()
    assert counts["impressions"]["written"] == 3 and counts["events"]["written"] == 2
    assert [f.relative_to(tmp_path).as_posix() for f in _files(tmp_path, "impressions")] == [
        f"impressions/day=2023-11-14/{DAY1}-0_{DAY1}-1.parquet", f"impressions/day=2023-11-15/{DAY2}-0_{DAY2}-0.parquet"]
    assert [f.relative_to(tmp_path).as_posix() for f in _files(tmp_path, "events")] == [
        f"events/day=2023-11-14/{DAY1}-5_{DAY1}-5.parquet", f"events/day=2023-11-15/{DAY2}-7_{DAY2}-7.parquet"]

    imps = [pq.read_table(f) for f in _files(tmp_path, "impressions")]
    assert all(t.schema.equals(IMPRESSION_SCHEMA) for t in imps)
    first = imps[0].to_pylist()[0]
    assert first["stream_id"] == imp_ids[0] and first["day"] == "2023-11-14" and first["model_version"] == "v3"
    assert first["items"] == [{"item_id": "i1", "position": 1, "score": 0.9, "team": ""},
                              {"item_id": "i2", "position": 2, "score": None, "team": ""}]
    events = [pq.read_table(f) for f in _files(tmp_path, "events")]
    assert all(t.schema.equals(EVENT_SCHEMA) for t in events)
    attributed, purchase = events[0].to_pylist()[0], events[1].to_pylist()[0]
    assert (attributed["stream_id"], attributed["request_id"], attributed["position"], attributed["value"]) == (
        evt_ids[0], "r0", 2, None)
    assert (purchase["request_id"], purchase["position"], purchase["attributed"], purchase["value"]) == (
        None, None, "", 12.5)
    assert _pending(redis_url, keys.impressions) == 0 and _pending(redis_url, keys.events) == 0

    stats = sink.stats()
    assert stats["impressions"]["written"] == 3 and stats["impressions"]["lag"] == 0
    assert stats["events"]["written_until"] == f"{DAY2}-7" and stats["last_flush_at"] is not None
    assert sink.run_once() == {name: {"written": 0, "rejected": 0, "trimmed": 0, "skipped": 0}
                               for name in ("impressions", "events")}


def test_history_before_the_group_is_persisted_and_lag_counts_unread(redis_url, tmp_path):
    prefix = _prefix()
    _add(redis_url, Keys(prefix).events, [_event(i) for i in range(5)])
    sink = StreamSink(_config(redis_url, prefix, tmp_path))
    assert sink.stats()["events"]["lag"] is None  # no group yet
    sink.run_once()
    _add(redis_url, Keys(prefix).events, [_event(i) for i in range(5, 9)])
    assert sink.stats()["events"]["lag"] == 4
    sink.run_once()
    assert sink.stats()["events"]["lag"] == 0
    assert len(_stream_ids(tmp_path, "events")) == 9


def test_unparseable_entries_are_rejected_with_the_error_and_acked(redis_url, tmp_path):
    prefix = _prefix()
    keys = Keys(prefix)
    bad_imp = {**_impression(1), "items": "not json"}
    _add(redis_url, keys.impressions, [_impression(0), bad_imp, _impression(2)])
    bad_ids = _add(redis_url, keys.events, [_event(0, item_idx="x"), _event(1, item_idx="99999999999"), _event(2)])
    sink = StreamSink(_config(redis_url, prefix, tmp_path))
    counts = sink.run_once()
    assert counts["impressions"] == {"written": 2, "rejected": 1, "trimmed": 0, "skipped": 0}
    assert counts["events"] == {"written": 1, "rejected": 2, "trimmed": 0, "skipped": 0}  # int32 overflow too
    lines = [json.loads(x) for x in (tmp_path / "rejected" / "impressions.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and "items" in lines[0]["error"] and lines[0]["fields"]["items"] == "not json"
    assert lines[0]["stream"] == keys.impressions
    events = [json.loads(x) for x in (tmp_path / "rejected" / "events.jsonl").read_text().splitlines()]
    assert [e["stream_id"] for e in events] == bad_ids[:2]
    assert _pending(redis_url, keys.impressions) == 0 and _pending(redis_url, keys.events) == 0
    assert sink.stats()["events"]["rejected"] == 2


def test_entries_without_ts_are_rejected_not_fatal(redis_url, tmp_path):
    """A missing `ts` is a bad entry like any other (it raised KeyError, which stopped every pass)."""
    prefix = _prefix()
    keys = Keys(prefix)
    _add(redis_url, keys.events, [_event(0), {k: v for k, v in _event(1).items() if k != "ts"}])
    _add(redis_url, keys.impressions, [_impression(0), {k: v for k, v in _impression(1).items() if k != "ts"}])
    counts = StreamSink(_config(redis_url, prefix, tmp_path)).run_once()
    assert counts["events"] == counts["impressions"] == {"written": 1, "rejected": 1, "trimmed": 0, "skipped": 0}
    for kind in ("events", "impressions"):
        (line,) = [json.loads(x) for x in (tmp_path / "rejected" / f"{kind}.jsonl").read_text().splitlines()]
        assert "field 'ts' missing" in line["error"]


def test_entries_trimmed_while_pending_are_counted(redis_url, tmp_path):
    prefix = _prefix()
    stream = Keys(prefix).events
    _add(redis_url, stream, [_event(i) for i in range(4)])
    reader = EventStream(StreamConfig(url=redis_url, stream=stream, group="sink", consumer="sink"))
    reader.ensure_group("0")
    assert len(reader.read(count=10)) == 4  # delivered to the sink's consumer, never acked (a crash)
    reader.client.xtrim(stream, maxlen=0)
    reader.close()
    sink = StreamSink(_config(redis_url, prefix, tmp_path))
    assert sink.run_once()["events"]["trimmed"] == 4
    assert _pending(redis_url, stream) == 0 and _files(tmp_path, "events") == []


class CrashBeforeAck(StreamSink):
    def _ack(self, part, ids):
        raise SimulatedCrash("after os.replace, before XACK")


class CrashAfterFirstFile(StreamSink):
    def _write_file(self, part, day, table):
        if _files(self.out, part.kind.name):
            raise SimulatedCrash("between two day files")
        super()._write_file(part, day, table)


def test_crash_between_write_and_ack_then_restart_writes_no_duplicates(redis_url, tmp_path):
    prefix = _prefix()
    stream = Keys(prefix).events
    _add(redis_url, stream, [_event(i) for i in range(6)], [f"{DAY1}-{i}" for i in range(3)] + [
        f"{DAY2}-{i}" for i in range(3)])
    with pytest.raises(SimulatedCrash):
        CrashBeforeAck(_config(redis_url, prefix, tmp_path)).run_once()
    assert len(_files(tmp_path, "events")) == 2 and _pending(redis_url, stream) == 6
    files = _files(tmp_path, "events")
    _lease_lapses(redis_url, prefix)

    counts = StreamSink(_config(redis_url, prefix, tmp_path)).run_once()["events"]
    assert counts == {"written": 0, "rejected": 0, "trimmed": 0, "skipped": 6}
    assert _files(tmp_path, "events") == files and _pending(redis_url, stream) == 0

    # a crash between the two day files of one flush: the second day is written after the restart
    out2 = tmp_path / "second"
    prefix2 = _prefix()
    stream2 = Keys(prefix2).events
    ids = _add(redis_url, stream2, [_event(i) for i in range(6)], [f"{DAY1}-{i}" for i in range(3)] + [
        f"{DAY2}-{i}" for i in range(3)])
    with pytest.raises(SimulatedCrash):
        CrashAfterFirstFile(_config(redis_url, prefix2, out2)).run_once()
    assert _stream_ids(out2, "events") == ids[:3]
    _lease_lapses(redis_url, prefix2)
    sink = StreamSink(_config(redis_url, prefix2, out2))
    assert sink.run_once()["events"] == {"written": 3, "rejected": 0, "trimmed": 0, "skipped": 3}
    assert _stream_ids(out2, "events") == ids and _pending(redis_url, stream2) == 0

    # the same sink object after an error in its own pass: it recovers its pending entries first
    ids += _add(redis_url, stream2, [_event(i) for i in range(6, 9)])
    original_ack = sink._ack
    sink._ack = lambda part, entry_ids: (_ for _ in ()).throw(redis.ConnectionError("gone"))
    with pytest.raises(redis.ConnectionError):
        sink.run_once()
    sink._ack = original_ack
    assert sink.run_once()["events"]["skipped"] == 3
    assert _stream_ids(out2, "events") == ids and _pending(redis_url, stream2) == 0


SINK_SCRIPT = ("import sys, threading\n"
               "from rerank.eventlog.sink import SinkConfig, StreamSink\n"
               "url, prefix, out, batch, lease_ttl_s = sys.argv[1:]\n"
               "sink = StreamSink(SinkConfig(url, prefix, out, batch=int(batch), block_ms=100,\n"
               "                             lease_ttl_s=float(lease_ttl_s)))\n"
               "print(sink.lease.token, flush=True)\n"
               "sink.run(threading.Event())\n")


def _wait_for_more_files(out: Path, than: int, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(_files(out, "impressions")) + len(_files(out, "events")) <= than:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the sink subprocess wrote nothing"
        time.sleep(0.005)


def test_kill_9_mid_way_then_restart_persists_every_entry_exactly_once(redis_url, tmp_path):
    prefix, rng = _prefix(), random.Random(7)
    keys = Keys(prefix)
    added: dict[str, list[str]] = {"impressions": [], "events": []}
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for round_ in range(8):  # 8 x (1,250 impressions + 1,250 events) = 20,000 entries
        base = round_ * 1250
        added["impressions"] += _add(redis_url, keys.impressions, [_impression(base + i) for i in range(1250)])
        added["events"] += _add(redis_url, keys.events, [_event(base + i) for i in range(1250)])
        before = len(_files(tmp_path, "impressions")) + len(_files(tmp_path, "events"))
        proc = subprocess.Popen([sys.executable, "-c", SINK_SCRIPT, redis_url, prefix, str(tmp_path), "150", "0.5"],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_for_more_files(tmp_path, before, proc)
            time.sleep(rng.uniform(0.0, 0.1))
        finally:
            proc.kill()  # SIGKILL: no cleanup, possibly between a file and its XACK
            proc.wait()

    assert len(_stream_ids(tmp_path, "impressions") + _stream_ids(tmp_path, "events")) < 20_000  # killed mid-way
    totals = _drain(StreamSink(_config(redis_url, prefix, tmp_path, batch=1000)))
    for kind in ("impressions", "events"):
        written = collections.Counter(_stream_ids(tmp_path, kind))
        assert [sid for sid, n in written.items() if n > 1] == []
        assert set(written) == set(added[kind]) and len(written) == 10_000
        assert _pending(redis_url, getattr(keys, kind)) == 0
    assert list(tmp_path.glob("*/day=*/.*.tmp")) == []
    assert totals["impressions.rejected"] == totals["events.rejected"] == 0


def test_keep_days_deletes_old_partitions(redis_url, tmp_path):
    prefix = _prefix()
    now_id = f"{int(time.time() * 1000)}-0"
    _add(redis_url, Keys(prefix).impressions, [_impression(0), _impression(1), _impression(2)],
         [f"{DAY1}-0", f"{DAY2}-0", now_id])
    old = tmp_path / "impressions" / "day=2020-01-01"
    old.mkdir(parents=True)
    (old / "1577836800000-0_1577836800000-0.parquet").write_bytes(b"")
    sink = StreamSink(_config(redis_url, prefix, tmp_path, keep_days=1))
    assert sink.run_once()["impressions"]["written"] == 3
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert [p.name for p in (tmp_path / "impressions").iterdir()] == [f"day={today}"]
    assert _stream_ids(tmp_path, "impressions") == [now_id]


def test_cli_once_persists_the_streams_and_prints_counts(redis_url, tmp_path, capsys):
    from rerank.cli.main import main

    prefix = _prefix()
    _add(redis_url, Keys(prefix).impressions, [_impression(i) for i in range(3)])
    _add(redis_url, Keys(prefix).events, [_event(i) for i in range(2)])
    assert main(["sink", "--redis-url", redis_url, "--prefix", prefix, "--out", str(tmp_path), "--once"]) == 0
    totals = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert totals["impressions"]["written"] == 3 and totals["events"]["written"] == 2
    assert len(_stream_ids(tmp_path, "events")) == 2


def test_event_sink_deployment_backs_off_on_redis_outage_and_resumes(redis_server, redis_url, tmp_path):
    from deployments.sink import EventSink

    prefix = _prefix()
    secret_url = redis_url.replace("redis://", "redis://:hunter2-secret@")
    sink = EventSink.func_or_class(redis_url, str(tmp_path), prefix=prefix)
    _add(redis_url, Keys(prefix).events, [_event(i) for i in range(3)])
    _wait(lambda: sink.stats()["events"]["written"] == 3)
    assert sink.stats()["state"] == "running"
    redis_server.stop()
    try:
        _wait(lambda: sink.stats()["state"] == "backoff")
        sink.check_health()  # an outage is not a dead replica
        assert sink.stats()["error"] and sink.stats()["events"]["lag"] is None
    finally:
        redis_server.start()
    _add(redis_url, Keys(prefix).events, [_event(i) for i in range(3, 5)])
    _wait(lambda: sink.stats()["events"]["written"] == 5, timeout_s=15)
    assert sink.stats()["state"] == "running"

    def fail(**_):
        raise RuntimeError(f"cannot reach {secret_url}")

    sink.sink.run_once = fail
    _wait(lambda: sink.stats()["error"] is not None and "cannot reach" in sink.stats()["error"])
    assert "hunter2-secret" not in sink.stats()["error"] and ":***@" in sink.stats()["error"]
    assert sink.stop()["state"] == "stopped"


def _wait(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_flush_every_s_buffers_reads_into_fewer_files_and_keeps_them_pending(redis_url, tmp_path):
    prefix, out = _prefix(), tmp_path / "out"
    stream = Keys(prefix).events
    sink = StreamSink(_config(redis_url, prefix, out, flush_every_s=60.0, batch=1000))
    for round_ in range(3):
        _add(redis_url, stream, [_event(round_ * 10 + i) for i in range(10)])
        sink.run_once()
    assert _files(out, "events") == [] and _pending(redis_url, stream) == 30  # read, not yet written or acked
    sink.run_once(force=True)
    assert len(_files(out, "events")) == 1 and len(_stream_ids(out, "events")) == 30
    assert _pending(redis_url, stream) == 0
    sink.close()


# ---------------------------------------------------------------------- one sink per stream (the lease)
ZERO = {"written": 0, "rejected": 0, "trimmed": 0, "skipped": 0}


def _assert_each_once(out: Path, kind: str, added: list[str]) -> None:
    written = collections.Counter(_stream_ids(out, kind))
    assert [sid for sid, n in written.items() if n > 1] == [], "entries written twice"
    assert sorted(written) == sorted(added), "entries lost"


def test_a_second_sink_stands_by_and_takes_over_at_once_when_the_holder_releases(redis_url, tmp_path):
    prefix = _prefix()
    stream = Keys(prefix).events
    holder = StreamSink(_config(redis_url, prefix, tmp_path, flush_every_s=60.0))
    standby = StreamSink(_config(redis_url, prefix, tmp_path, flush_every_s=60.0))
    added = _add(redis_url, stream, [_event(i) for i in range(10)])
    assert holder.run_once(force=True)["events"]["written"] == 10

    added += _add(redis_url, stream, [_event(i) for i in range(10, 15)])
    assert standby.run_once(force=True) == {"impressions": ZERO, "events": ZERO}
    assert _pending(redis_url, stream) == 0 and len(_files(tmp_path, "events")) == 1  # it read nothing
    assert (standby.stats()["standby"], standby.stats()["lease_held"]) == (True, False)
    assert (holder.stats()["standby"], holder.stats()["lease_held"]) == (False, True)

    holder.run_once()  # reads the 5 into its buffer (flush_every_s), then stops without a last flush
    assert _pending(redis_url, stream) == 5
    holder.close()  # releases the lease: no wait for its TTL
    added += _add(redis_url, stream, [_event(i) for i in range(15, 20)])
    assert standby.run_once(force=True)["events"] == {**ZERO, "written": 10}  # the holder's 5 + 5 new
    assert (standby.stats()["standby"], standby.stats()["lease_held"]) == (False, True)
    _assert_each_once(tmp_path, "events", added)
    assert _pending(redis_url, stream) == 0
    standby.close()
    assert _client(redis_url).get(Keys(prefix).sink_lease) is None


def test_an_expired_holder_is_replaced_never_writes_again_and_rereads_the_files_when_back(redis_url, tmp_path):
    prefix = _prefix()
    stream = Keys(prefix).events
    stalled = StreamSink(_config(redis_url, prefix, tmp_path, flush_every_s=60.0, lease_ttl_s=1.0))
    successor = StreamSink(_config(redis_url, prefix, tmp_path))
    added = _add(redis_url, stream, [_event(i) for i in range(10)])
    stalled.run_once()  # 10 read into its buffer, pending
    assert successor.run_once()["events"] == ZERO and successor.standby
    time.sleep(1.1)  # the holder stalls past its TTL
    assert successor.run_once()["events"] == {**ZERO, "written": 10}  # recovered the stalled one's entries

    added += _add(redis_url, stream, [_event(i) for i in range(10, 15)])
    assert stalled.run_once(force=True)["events"] == ZERO  # back: its buffer is never written
    assert stalled.standby and stalled.stats()["lease_losses"] == 1
    successor._ack = lambda part, ids: (_ for _ in ()).throw(SimulatedCrash("after os.replace, before XACK"))
    with pytest.raises(SimulatedCrash):
        successor.run_once()
    assert _pending(redis_url, stream) == 5 and len(_stream_ids(tmp_path, "events")) == 15
    _lease_lapses(redis_url, prefix)  # the successor crashed

    # the first sink takes the lease again: the files' high-water mark (the successor's) is read anew,
    # so the pending entries already in a file are skipped, not written twice
    added += _add(redis_url, stream, [_event(i) for i in range(15, 18)])
    assert stalled.run_once(force=True)["events"] == {**ZERO, "written": 3, "skipped": 5}
    assert not stalled.standby
    _assert_each_once(tmp_path, "events", added)
    assert _pending(redis_url, stream) == 0


class LosesTheLeaseAfterFirstFile(StreamSink):
    """Its lease goes to `successor` right after its first file (as if it stalled past the TTL there)."""

    successor: StreamSink | None = None

    def _write_file(self, part, day, table):
        super()._write_file(part, day, table)
        if self.successor is not None:
            self.lease.client.delete(self.lease.key)
            assert self.successor.lease.acquire()
            self.successor = None


def test_a_holder_that_loses_the_lease_mid_flush_writes_no_further_file(redis_url, tmp_path):
    prefix = _prefix()
    stream = Keys(prefix).events
    ids = _add(redis_url, stream, [_event(i) for i in range(6)], [f"{DAY1}-{i}" for i in range(3)] + [
        f"{DAY2}-{i}" for i in range(3)])
    holder = LosesTheLeaseAfterFirstFile(_config(redis_url, prefix, tmp_path))
    holder.successor = successor = StreamSink(_config(redis_url, prefix, tmp_path))
    assert holder.run_once()["events"] == ZERO  # the day-1 file, then no day-2 file and no ack
    assert _stream_ids(tmp_path, "events") == ids[:3] and _pending(redis_url, stream) == 6
    assert holder.standby and holder.stats()["lease_losses"] == 1
    assert successor.run_once()["events"] == {**ZERO, "written": 3, "skipped": 3}
    assert holder.run_once()["events"] == ZERO and holder.standby
    _assert_each_once(tmp_path, "events", ids)
    assert _pending(redis_url, stream) == 0


class LosesTheLeaseWhileWriting(StreamSink):
    """Its lease goes to `successor` while its first file is being written (before the rename)."""

    successor: StreamSink | None = None

    def _check_lease(self):
        if self.successor is not None and list(self.out.glob("*/day=*/.*.tmp")):
            self.lease.client.delete(self.lease.key)
            assert self.successor.lease.acquire()
            self.successor = None
        super()._check_lease()


def test_a_file_written_while_the_lease_was_lost_is_never_renamed_into_place(redis_url, tmp_path):
    prefix = _prefix()
    stream = Keys(prefix).events
    ids = _add(redis_url, stream, [_event(i) for i in range(3)])
    holder = LosesTheLeaseWhileWriting(_config(redis_url, prefix, tmp_path))
    holder.successor = successor = StreamSink(_config(redis_url, prefix, tmp_path))
    assert holder.run_once()["events"] == ZERO and holder.standby
    assert _files(tmp_path, "events") == [] and list(tmp_path.glob("*/day=*/.*.tmp")) == []
    assert successor.run_once()["events"] == {**ZERO, "written": 3}
    _assert_each_once(tmp_path, "events", ids)


def test_two_sink_processes_write_each_entry_once_across_a_kill_9_of_the_holder(redis_url, tmp_path):
    prefix = _prefix()
    keys = Keys(prefix)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    by_token: dict[str, subprocess.Popen] = {}
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", SINK_SCRIPT, redis_url, prefix, str(tmp_path), "200", "1.5"],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        by_token[proc.stdout.readline().decode().strip()] = proc
    client = _client(redis_url)
    try:
        added = _add(redis_url, keys.events, [_event(i) for i in range(1000)])
        _wait(lambda: client.get(keys.sink_lease) in by_token)
        holder = by_token.pop(client.get(keys.sink_lease))
        _wait_for_more_files(tmp_path, 0, holder)
        holder.kill()  # SIGKILL mid-way: the other process takes over once the lease lapses (1.5 s)
        holder.wait()
        added += _add(redis_url, keys.events, [_event(i) for i in range(1000, 2000)])
        (survivor,) = by_token.values()
        _wait(lambda: len(set(_stream_ids(tmp_path, "events"))) == 2000, timeout_s=30)
        assert survivor.poll() is None and by_token[client.get(keys.sink_lease)] is survivor
        _wait(lambda: _pending(redis_url, keys.events) == 0)
    finally:
        for proc in by_token.values():
            proc.kill()
            proc.wait()
        client.close()
    _assert_each_once(tmp_path, "events", added)
    assert list(tmp_path.glob("*/day=*/.*.tmp")) == []


def test_event_sink_deployment_stands_by_then_takes_over_when_the_holder_stops(redis_url, tmp_path):
    from deployments.sink import EventSink

    prefix = _prefix()
    stream = Keys(prefix).events
    first = EventSink.func_or_class(redis_url, str(tmp_path), prefix=prefix, flush_every_s=0.0, lease_ttl_s=2.0)
    _wait(lambda: first.stats()["lease_held"])
    second = EventSink.func_or_class(redis_url, str(tmp_path), prefix=prefix, flush_every_s=0.0, lease_ttl_s=2.0)
    try:
        added = _add(redis_url, stream, [_event(i) for i in range(5)])
        _wait(lambda: first.stats()["events"]["written"] == 5 and second.stats()["state"] == "standby")
        assert second.stats()["standby"] and second.stats()["events"]["written"] == 0
        assert first.stop()["state"] == "stopped"  # last flush, then releases the lease
        added += _add(redis_url, stream, [_event(i) for i in range(5, 8)])
        _wait(lambda: second.stats()["events"]["written"] == 3)
        assert second.stats()["state"] == "running" and second.stats()["lease_held"]
    finally:
        first.stop()
        second.stop()
    _assert_each_once(tmp_path, "events", added)
    assert _client(redis_url).get(Keys(prefix).sink_lease) is None


def test_cli_once_waits_for_the_lease_then_fails_or_persists(redis_url, tmp_path, capsys):
    from rerank.cli.main import main

    prefix = _prefix()
    ids = _add(redis_url, Keys(prefix).events, [_event(i) for i in range(4)])
    holder = StreamSink(_config(redis_url, prefix, tmp_path))
    assert holder.run_once()["events"]["written"] == 4
    argv = ["sink", "--redis-url", redis_url, "--prefix", prefix, "--out", str(tmp_path), "--once"]
    assert main([*argv, "--lease-ttl", "1.5"]) == 2  # waited its own TTL for the lease, in vain
    assert "holds the lease" in capsys.readouterr().err
    assert main([*argv, "--lease-ttl", "1"]) == 2
    assert "lease_ttl_s" in capsys.readouterr().err  # too short to be renewed by 0.5 s passes
    holder.close()
    ids += _add(redis_url, Keys(prefix).events, [_event(i) for i in range(4, 6)])
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["events"]["written"] == 2
    _assert_each_once(tmp_path, "events", ids)

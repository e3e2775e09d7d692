"""StreamSink: the impressions and events streams to day-partitioned Parquet, exactly once.

Layout under `out_dir` (schemas in rerank.eventlog.records):

    impressions/day=YYYY-MM-DD/<first_id>_<last_id>.parquet
    events/day=YYYY-MM-DD/<first_id>_<last_id>.parquet
    rejected/impressions.jsonl, rejected/events.jsonl   entries that do not parse, with the error
                                                        (each at most rejected_max_bytes, then rotated
                                                        to <name>.1.jsonl: at most twice that on disk)

Each stream is read in consumer group `group` (created from id 0, so history already in the
stream is kept). A flush writes one file per day (temp name, fsync, os.replace, in id order)
and only then XACKs. On (re)start the highest id already in a file name is the high-water
mark: pending entries at or below it were written before the crash and are acked without
being written again, the rest are written. Rejected lines are at-least-once: a crash between
logging them and the ack logs them again. Redis errors propagate (the caller backs off);
after one, the next pass recovers the pending entries first.

One sink per stream: a sink reads and writes only while it holds the Redis lease
`Keys(prefix).sink_lease` (rerank.store.lease), renewed every pass and before every file. Another sink
(a redeploy's second replica, a second `rerank sink`) stands by: no reads, no writes. A holder that
loses the lease (or finds that it lapsed) writes no further file and forgets its in-memory state;
whoever holds it next recovers the pending entries (every sink is the same consumer) and re-reads the
files' high-water marks, so a takeover loses nothing and writes nothing twice. A file is renamed into
place only after a renewal right before the rename; the lease is not a fencing token, so a holder
stalled for longer than the TTL between that renewal and the rename could still publish that one
file; its rows repeat entries the next holder writes too, and readers take each stream_id once
(rerank.experiments.readout.load_parquet), so such a duplicate is never counted twice. All sinks of one
stream must write to one out_dir (shared storage across nodes).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from rerank.store.keys import Keys
from rerank.store.lease import RedisLease
from rerank.eventlog.records import event_row, events_table, impression_row, impressions_table
from rerank.store.stream import EventStream, StreamConfig, StreamEntry, id_key

LAG_CAP = 100_000  # Redis < 7 has no group lag: unread entries are counted up to this many
BAD_ENTRY = (ValueError, TypeError)  # pyarrow's ArrowInvalid is a ValueError


@dataclass
class SinkConfig:
    redis_url: str
    prefix: str
    out_dir: str | Path
    group: str = "sink"
    consumer: str = "sink"
    batch: int = 5000  # entries per read (and per recovery chunk) of each stream
    block_ms: int = 500  # how long an idle pass waits for new entries
    keep_days: int | None = None  # delete day partitions older than today (UTC) minus this many days
    rejected_max_bytes: int = 16 * 1024 * 1024  # per rejected/<stream>.jsonl; rotated once to .1.jsonl
    flush_every_s: float = 0.0  # keep read entries (pending, unacked) up to this long or `batch` of them
    #                             per stream before writing: fewer, larger files (0 = every pass)
    lease_ttl_s: float = 10.0  # the single-sink lease: renewed every pass and around every file; a sink
    #                            that stops renewing (killed, stalled) loses it after this long

    def __post_init__(self) -> None:
        if self.lease_ttl_s * 1000 < 3 * self.block_ms:
            raise ValueError(f"lease_ttl_s ({self.lease_ttl_s}) must be at least 3 x block_ms ({self.block_ms} ms): "
                             "a pass renews the lease once")


@dataclass
class SinkCounts:
    written: int = 0  # rows in Parquet files
    rejected: int = 0  # entries that did not parse (in rejected/<stream>.jsonl)
    trimmed: int = 0  # entries trimmed from the stream while pending (lost before the sink saw them)
    skipped: int = 0  # entries already in Parquet before a restart: acked, not written again


@dataclass(frozen=True)
class _Kind:
    name: str  # directory and rejected file name
    row: Callable[[str, dict[str, str]], dict]
    table: Callable[[list[dict]], pa.Table]


KINDS = (_Kind("impressions", impression_row, impressions_table), _Kind("events", event_row, events_table))


@dataclass
class _Part:
    """One stream's reader, directory, high-water mark and counts."""

    kind: _Kind
    stream: EventStream
    root: Path
    written_until: str | None = None  # highest stream id in a Parquet file
    counts: SinkCounts = field(default_factory=SinkCounts)
    buffer: list[StreamEntry] = field(default_factory=list)  # read, not yet written (pending in Redis)
    buffer_since: float = 0.0  # monotonic time of the buffer's first read

    def is_new(self, entry_id: str) -> bool:
        return self.written_until is None or id_key(entry_id) > id_key(self.written_until)


class _LeaseLost(Exception):
    """The sink's hold on the lease broke: stop writing (the pass ends, nothing more is written)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def highest_written_id(root: Path) -> str | None:
    """The highest `<last>` of the `<first>_<last>.parquet` files under root/day=*/."""
    lasts = [p.stem.rpartition("_")[2] for p in root.glob("day=*/*.parquet")]
    return max(lasts, key=id_key, default=None)


def _convert(kind: _Kind, rows: list[dict]) -> tuple[pa.Table, list[tuple[dict, str]]]:
    """The table of rows; rows pyarrow refuses (e.g. an int32 overflow) come back with the error."""
    try:
        return kind.table(rows), []
    except BAD_ENTRY:
        good, bad = [], []
        for row in rows:
            try:
                kind.table([row])
                good.append(row)
            except BAD_ENTRY as err:
                bad.append((row, str(err)))
        return kind.table(good), bad


class StreamSink:
    """Persist `Keys(prefix).impressions` and `.events` to Parquet under config.out_dir."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.out = Path(config.out_dir)
        keys = Keys(config.prefix)
        self.parts = [
            _Part(kind, EventStream(StreamConfig(url=config.redis_url, stream=stream, group=config.group,
                                                 consumer=config.consumer, block_ms=config.block_ms)),
                  self.out / kind.name)
            for kind, stream in zip(KINDS, (keys.impressions, keys.events))
        ]
        self.last_flush_at: float | None = None
        lease_client = redis.Redis.from_url(config.redis_url, decode_responses=True, socket_timeout=2.0,
                                            socket_connect_timeout=2.0)
        self.lease = RedisLease(lease_client, keys.sink_lease, config.lease_ttl_s)
        self.standby = False  # the last pass found the lease with another sink: it read and wrote nothing
        self.lease_losses = 0  # times this sink's hold on the lease broke (taken over, or lapsed)
        self._term: int | None = None  # the lease term that the buffers and high-water marks belong to
        self._recovered = False
        self._lock = threading.Lock()  # one pass at a time (a loop thread and a final flush)

    # ------------------------------------------------------------------ passes
    def run_once(self, block_ms: int | None = None, force: bool = False) -> dict[str, dict[str, int]]:
        """Take or renew the lease, recover if needed, then read each stream once and write what is
        due (all of it with `force` or flush_every_s 0); this pass's counts per stream. Only the last
        read waits (block_ms, default config.block_ms), and only when the others found nothing.
        Without the lease (another sink holds it) the pass only waits block_ms and sets `standby`."""
        block_ms = self.config.block_ms if block_ms is None else block_ms
        with self._lock:
            before = {p.kind.name: asdict(p.counts) for p in self.parts}
            try:
                self.standby = not self._hold_lease()
                if self.standby:
                    time.sleep(block_ms / 1000)  # like an idle read, so that a standby loop does not spin
                    return self._counts_since(before)
                if not self._recovered:
                    self._recover()
                found = False
                for i, part in enumerate(self.parts):
                    wait = block_ms if i == len(self.parts) - 1 and not found else 0
                    entries = self._read(part, wait)
                    found = found or bool(entries)
                    if entries and not part.buffer:
                        part.buffer_since = time.monotonic()
                    part.buffer.extend(entries)
                    if part.buffer and (force or len(part.buffer) >= self.config.batch
                                        or time.monotonic() - part.buffer_since >= self.config.flush_every_s):
                        self._flush(part, part.buffer)
                        part.buffer = []
                self._prune()
            except _LeaseLost:
                self._forget()  # our unwritten entries stay pending: the next holder writes them
                self.standby = not self.lease.held
            except BaseException:
                self._forget()
                raise
            return self._counts_since(before)

    def _counts_since(self, before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        return {p.kind.name: {k: v - before[p.kind.name][k] for k, v in asdict(p.counts).items()}
                for p in self.parts}

    def _forget(self) -> None:
        """Drop the in-memory state: the next pass recovers pending entries and re-reads the files."""
        self._recovered = False
        for part in self.parts:
            part.buffer = []  # still pending in Redis: the recovery reads them again

    def run(self, stop: threading.Event, on_pass: Callable[[dict], None] | None = None) -> None:
        """Pass after pass until `stop` is set; `on_pass` gets each pass's counts."""
        while not stop.is_set():
            counts = self.run_once()
            if on_pass is not None:
                on_pass(counts)

    # ------------------------------------------------------------------ the lease
    def _hold_lease(self) -> bool:
        """Take or renew the lease. A broken hold (lost, or lapsed and taken again) forgets the
        in-memory state: another sink may have written meanwhile."""
        held = self.lease.acquire()
        term = self.lease.term if held else None
        if term != self._term:
            if self._term is not None:
                self.lease_losses += 1
            self._forget()
            self._term = term
        return held

    def _check_lease(self) -> None:
        """Before a write: renew the lease, raise _LeaseLost unless the hold is unbroken."""
        term = self._term
        if not self._hold_lease() or self._term != term:
            raise _LeaseLost(self.lease.key)

    @property
    def lease_held(self) -> bool:
        return self.lease.held

    def _recover(self) -> None:
        for part in self.parts:
            part.stream.ensure_group("0")
            for tmp in part.root.glob("day=*/.*.tmp"):  # a write cut short by a crash
                tmp.unlink()
            on_disk = highest_written_id(part.root)
            if on_disk is not None and part.is_new(on_disk):
                part.written_until = on_disk
            before = part.stream.trimmed
            entries = part.stream.recover()
            part.counts.trimmed += part.stream.trimmed - before
            for i in range(0, len(entries), self.config.batch):
                self._flush(part, entries[i : i + self.config.batch])
        self._recovered = True

    def _read(self, part: _Part, block_ms: int) -> list[StreamEntry]:
        before = part.stream.trimmed
        entries = part.stream.read(self.config.batch, block_ms=block_ms)
        part.counts.trimmed += part.stream.trimmed - before
        return entries

    # ------------------------------------------------------------------ one flush
    def _flush(self, part: _Part, entries: list[StreamEntry]) -> None:
        """Reject, write (one file per day, in id order), then ack `entries`."""
        if not entries:
            return
        fresh = [e for e in entries if part.is_new(e.id)]
        by_day: dict[str, list[dict]] = defaultdict(list)
        rejected: list[tuple[StreamEntry, str]] = []
        for entry in fresh:
            try:
                row = part.kind.row(entry.id, entry.fields)
            except BAD_ENTRY as err:
                rejected.append((entry, str(err)))
                continue
            by_day[row["day"]].append(row)
        tables = {}
        entry_by_id = {e.id: e for e in fresh}
        for day, rows in by_day.items():
            tables[day], bad = _convert(part.kind, rows)
            rejected += [(entry_by_id[row["stream_id"]], error) for row, error in bad]
        if rejected:
            self._check_lease()
            self._write_rejected(part, sorted(rejected, key=lambda r: id_key(r[0].id)))
        for day in sorted(tables):
            if tables[day].num_rows:
                self._write_file(part, day, tables[day])  # renews the lease right before its rename
        self._ack(part, [e.id for e in entries])
        part.counts.written += sum(t.num_rows for t in tables.values())
        part.counts.rejected += len(rejected)
        part.counts.skipped += len(entries) - len(fresh)
        self.last_flush_at = time.time()

    def _write_file(self, part: _Part, day: str, table: pa.Table) -> None:
        ids = table.column("stream_id")
        first, last = ids[0].as_py(), ids[-1].as_py()
        folder = part.root / f"day={day}"
        if not folder.is_dir():
            folder.mkdir(parents=True)
            _fsync_dir(folder.parent)
        final = folder / f"{first}_{last}.parquet"
        tmp = folder / f".{final.name}.tmp"
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            self._check_lease()  # the write took a while: publish the file only if the hold is unbroken
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)
        _fsync_dir(folder)
        part.written_until = last

    def _write_rejected(self, part: _Part, rejected: list[tuple[StreamEntry, str]]) -> None:
        folder = self.out / "rejected"
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        lines = "".join(json.dumps({"stream_id": entry.id, "stream": part.stream.config.stream, "error": error,
                                    "fields": entry.fields, "at": now}) + "\n" for entry, error in rejected)
        path = folder / f"{part.kind.name}.jsonl"
        if path.exists() and path.stat().st_size + len(lines.encode()) > self.config.rejected_max_bytes:
            os.replace(path, folder / f"{part.kind.name}.1.jsonl")  # the older rotation is dropped
        with open(path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def _ack(self, part: _Part, ids: list[str]) -> None:
        part.stream.ack(ids)

    # ------------------------------------------------------------------ retention, stats
    def _prune(self) -> None:
        """Delete day partitions older than keep_days (after the acks: a pending entry's file stays)."""
        if self.config.keep_days is None:
            return
        self._check_lease()
        today = dt.datetime.now(dt.timezone.utc).date()
        oldest_kept = f"day={today - dt.timedelta(days=self.config.keep_days):%Y-%m-%d}"
        for part in self.parts:
            for folder in part.root.glob("day=*"):
                if folder.name < oldest_kept:
                    shutil.rmtree(folder)

    def lag(self, part: _Part) -> int | None:
        """Entries of the stream not yet acked by the group: XINFO GROUPS lag (Redis 7), else
        pending + unread (unread capped at LAG_CAP); None when the group does not exist yet."""
        for group in part.stream.client.xinfo_groups(part.stream.config.stream):
            if group["name"] == self.config.group:
                if group.get("lag") is not None:
                    return int(group["lag"]) + int(group["pending"])
                return int(group["pending"]) + part.stream.behind(group["last-delivered-id"], LAG_CAP)
        return None

    def stats(self) -> dict:
        """Counts and lag per stream, the high-water mark, the last flush time, the lease (held,
        standing by, losses). Lag is None while Redis is unreachable (stats never raise for it)."""
        out: dict = {"last_flush_at": self.last_flush_at, "lease_held": self.lease.held, "standby": self.standby,
                     "lease_losses": self.lease_losses}
        for part in self.parts:
            try:
                lag = self.lag(part)
            except redis.RedisError:
                lag = None
            out[part.kind.name] = {**asdict(part.counts), "written_until": part.written_until, "lag": lag}
        return out

    def close(self) -> None:
        """Release the lease (a successor need not wait for the TTL; our pending entries are its to
        recover) and close the connections."""
        with self._lock:
            try:
                if self.lease.held:
                    self.lease.release()
            except redis.RedisError:
                pass  # unreachable: the lease lapses after lease_ttl_s
            finally:
                self._term = None
                self.lease.client.close()
                for part in self.parts:
                    part.stream.close()

"""`OnlineLoop` (Redis stream + registry): continuous learning from the event stream, exactly-once.

It reads the stream as one consumer of a group, trains (rerank.online.trainer) in full batches
of `batch_size` examples (the rest waits for the next poll, or is trained by the checkpoint,
before its guard check), and every `publish_every_s` seconds or `publish_every_events` events
publishes through the guard (rerank.online.guard).
`items_added` counts distinct new items: those a version it publishes is the first to hold,
beyond the most items of any version it stood on or published (the high-water mark
`items_high`, kept in the state file and the meta); items of a refused candidate are not
counted, nor counted again when the trainer regrows them on the serving weights (or after a
rollback).

The holdout. 1 in `holdout_every` events is held out for the guard. The choice is made
server-side, by a keyed hash (blake2b, rerank.online.examples.is_holdout) of the stream entry
id (assigned by Redis, stable across restarts) under a secret salt kept in the registry
(`holdout_salt.json`, made at the first start): a client can neither pick its event's fate
(as it could with a hash of its own `event_id`) nor, knowing or guessing an entry id (the
server's ms clock + a sequence number), predict it; and a replayed entry is classified the
same after a restart.

Exactly-once. A *checkpoint* is the trainer state file `trainer_state.json` in the registry
(`version` = the weights the trainer stands on, `trained_until_id` = the last stream id
consumed, counters), written after a successful publish (with the same numbers in the version's
meta.json) or after a refusal (the version stays, the refused events are counted as
`events_refused`). Entries are XACKed only after the checkpoint that covers them is written.
A publish moves LATEST before the state file is written; a crash in between leaves a state file
older than LATEST, so on (re)start the loop takes whichever of the two is further along the
stream: the state file, or LATEST's meta when LATEST is a version of this trainer (it has
`trained_until_id`; its meta carries the same counters the state file would have).
On (re)start the loop loads that checkpoint and its version's weights, recovers its own and dead
consumers' pending entries, acks without applying every entry with id <= trained_until_id (its
effect is already in the checkpoint), and applies the rest once, in stream order. So every
stream entry is counted exactly once in `events_applied` (= trained + held out + invalid;
`events_refused` counts the trained ones whose candidate the guard refused). A checkpoint that
fails (the registry unreachable, a pin or a concurrent publish at the commit) keeps its entries
consumed-but-uncheckpointed (not acked, still applied) and, except for a pin/conflict, re-raises
so the caller backs off; the next checkpoint covers them. The backlog is bounded: once
`max_uncommitted` entries wait for a checkpoint (the registry down for long), poll_once reads
nothing new (`stats.backlogged`), it only retries the checkpoint, so neither the loop's memory
nor the group's pending list grows with the outage; unread entries wait in the stream (its
MAXLEN trimming applies to them as to any lag). Entries recovered at a start are all taken,
whatever their number. (If only the state write after a successful publish fails, the
version's meta is their checkpoint: they are acked, the error is re-raised, and the next
checkpoint rewrites the state.) Rollback: see rerank/models/registry.py; while LATEST is pinned the
loop reads nothing; when the pin is released (or LATEST moved to another version) it reloads
LATEST's version, resets the counters to the last checkpoint's and re-applies the events it had
consumed but not checkpointed, so they are counted once.
"""

from __future__ import annotations

import copy
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

from rerank.data.dataset import EVENT_CODE
from rerank.online.config import OnlineConfig
from rerank.online.examples import Example, example_from_entry, in_arm, is_holdout
from rerank.online.guard import GuardResult, PublishGuard
from rerank.online.trainer import IncrementalTrainer
from rerank.store import entry
from rerank.store.entry import entry_number
from rerank.store.stream import id_key

if TYPE_CHECKING:
    from rerank.models.registry import ModelRegistry
    from rerank.models.sequential import SequentialRecommender
    from rerank.store.stream import EventStream, StreamEntry

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
SALT_FILE = "holdout_salt.json"  # the secret key of the holdout choice (see the module docstring)


@dataclass
class LoopStats:
    version: int | None = None
    trained_until_id: str | None = None  # stream id of the last entry in the checkpoint
    events_applied: int = 0  # every stream entry, counted once: trained + held out + invalid + other arm + not target
    events_other_arm: int = 0  # entries of other experiment arms (an arm's own trainer skips them)
    events_not_target: int = 0  # entries of a type outside config.target_types (context only, never a label)
    events_trimmed_unapplied: int = 0  # entries the stream cap trimmed before the loop applied them (not in applied)
    events_trained: int = 0
    events_heldout: int = 0
    events_invalid: int = 0
    events_over_max_items: int = 0  # of events_invalid: naming an item_idx (target or seq) above max_items
    events_refused: int = 0  # of events_trained: in a candidate the guard refused
    events_skipped_duplicate: int = 0  # redelivered entries already in the checkpoint (acked, not applied)
    versions_published: int = 0
    guard_refusals: int = 0
    items_added: int = 0  # distinct new items first included by a version this trainer published (see _publish)
    last_publish_at: float | None = None
    last_guard: dict = field(default_factory=dict)
    paused: bool = False
    backlogged: bool = False  # max_uncommitted entries wait for a checkpoint: reading nothing until one succeeds

    def to_dict(self) -> dict:
        return asdict(self)


COUNTERS = ("events_applied", "events_trained", "events_heldout", "events_invalid", "events_refused",
            "versions_published", "guard_refusals", "items_added", "events_other_arm", "events_over_max_items",
            "events_trimmed_unapplied", "events_not_target")


def stream_time_s(entry_id: str) -> float:
    """Redis server time (seconds) at which the entry was added: the ms part of its id."""
    return int(entry_id.partition("-")[0]) / 1000.0


class OnlineLoop:
    """The continuous-learning loop over a Redis stream and a model registry (no Ray; see module doc)."""

    def __init__(self, stream: "EventStream", registry: "ModelRegistry", config: OnlineConfig | None = None,
                 clock: Callable[[], float] = time.time,
                 on_publish: Callable[[int, list[float]], None] | None = None):
        self.stream = stream
        self.registry = registry
        self.config = config or OnlineConfig()
        self.clock = clock
        self.on_publish = on_publish  # (version, per-event stream->publish delays in s)
        self.stats = LoopStats()
        self.guard = PublishGuard(self.config)
        self.trainer: IncrementalTrainer | None = None
        self.serving: "SequentialRecommender | None" = None
        self._uncommitted: list["StreamEntry"] = []  # consumed since the last checkpoint
        self._window_trained = 0
        self._batch: list[Example] = []  # trained examples waiting for a full batch (or the checkpoint)
        self._last_checkpoint = clock()
        self._items: dict[int, str] = {}  # new item_idx -> item_id seen in the stream
        self._checkpointed: dict[str, int] = {}  # COUNTERS as of the last checkpoint
        self._items_high = 0  # the most items of any version this loop stood on or published
        self._n_seen: int | None = None  # the stream number `n` of the newest entry consumed (trim gaps)
        self._warned_over_max_items = False
        self.holdout_salt = b""  # the registry's secret, loaded by start()

    # ---------------------------------------------------------------- state
    def _load_state(self) -> dict:
        """The checkpoint to stand on: trainer_state.json, or LATEST's meta when that is further
        along the stream (a crash between a publish and its state write; see the module doc)."""
        state = self.registry.read_state(STATE_FILE)
        latest = self.registry.latest()
        if latest is None:
            if state is not None:
                return state
            raise RuntimeError(f"{self.registry.uri}: empty registry; publish a trained model first "
                               "(ModelRegistry.publish_dir or `rerank model publish`)")
        meta = self.registry.meta(latest)
        from_meta = {"version": latest, "trained_until_id": meta.get("trained_until_id"),
                     "items_high": meta.get("items_high"), "n_until": meta.get("n_until"),
                     **{k: int(meta.get(k) or 0) for k in COUNTERS}}
        if state is None:
            return from_meta
        ahead = meta.get("trained_until_id")  # None: not a version of this trainer (offline)
        done = state.get("trained_until_id")
        if ahead and (done is None or id_key(ahead) > id_key(done)):
            log.warning("%s: LATEST v%s covers the stream up to %s, %s only up to %s (a crash between "
                        "publish and state write): continuing from v%s", self.registry.uri, latest, ahead,
                        STATE_FILE, done, latest)
            return from_meta
        return state

    def _load_salt(self) -> bytes:
        """The registry's secret holdout salt, made (randomly) at the first start."""
        raw = self.registry.read_state(SALT_FILE)
        if raw and raw.get("holdout_salt"):
            return bytes.fromhex(raw["holdout_salt"])
        salt = secrets.token_bytes(32)
        self.registry.write_state(SALT_FILE, {"holdout_salt": salt.hex(), "created_at": time.time()})
        return salt

    def _stand_on(self, version: int) -> None:
        model = self.registry.load(version)
        self.serving = copy.deepcopy(model)
        if self.trainer is None:
            self.trainer = IncrementalTrainer(model, self.config)
        else:
            self.trainer.reset(model)
        self.stats.version = version
        if self.config.guard_anchor:
            self.guard.anchor = self._offline_baseline(version, model)
        self._batch = []  # examples of the old weights' window: the caller re-applies their entries
        self._items = {}
        self._items_high = max(self._items_high, model.n_items)

    def _offline_baseline(self, version: int, model: "SequentialRecommender") -> "SequentialRecommender | None":
        """The registry's newest version not made by a trainer (no `trained_until_id`): the offline
        model the online line descends from (registry retention keeps it). None when there is none."""
        offline = [v for v in self.registry.versions() if self.registry.meta(v).get("trained_until_id") is None]
        if not offline:
            return None
        if offline[-1] == version:
            return copy.deepcopy(model)
        return self.registry.load(offline[-1])

    def start(self) -> list["StreamEntry"]:
        """Load the checkpoint, then recover pending entries: ack those already applied, apply the rest."""
        state = self._load_state()
        for k in COUNTERS:
            setattr(self.stats, k, int(state.get(k) or 0))
        self._checkpointed = {k: getattr(self.stats, k) for k in COUNTERS}
        self.stats.trained_until_id = state.get("trained_until_id")
        self.holdout_salt = self._load_salt()
        self._items_high = int(state.get("items_high") or 0)
        self._n_seen = state.get("n_until")
        self._stand_on(int(state["version"]))
        self.stream.ensure_group()
        recovered = self.stream.recover()
        self._consume(recovered)
        return recovered

    # ---------------------------------------------------------------- consuming
    def _already_applied(self, entry_id: str) -> bool:
        done = self.stats.trained_until_id
        return done is not None and id_key(entry_id) <= id_key(done)

    def _consume(self, entries: list["StreamEntry"]) -> int:
        """Apply entries not yet in the checkpoint; returns how many were applied."""
        fresh, dup_ids = [], []
        for e in entries:
            (dup_ids if self._already_applied(e.id) else fresh).append(e)
        if dup_ids:
            self.stream.ack([e.id for e in dup_ids])
            self.stats.events_skipped_duplicate += len(dup_ids)
        self._count_trimmed(fresh)
        self._apply(fresh)
        self._uncommitted.extend(fresh)
        return len(fresh)

    def _count_trimmed(self, entries: list["StreamEntry"]) -> None:
        """Entries MAXLEN trimmed before this loop applied them: gaps in the stream numbers `n`
        (rerank.store.events numbers every entry). Counted, logged, never silent."""
        for e in entries:
            n = entry_number(e.fields)
            if n is None:
                continue  # an entry from before the numbering
            if self._n_seen is not None and n > self._n_seen + 1:
                lost = n - self._n_seen - 1
                self.stats.events_trimmed_unapplied += lost
                log.error("%d stream entries were trimmed (stream_maxlen) before the trainer applied them "
                          "(numbers %d..%d); the trainer is behind the stream cap", lost, self._n_seen + 1, n - 1)
            self._n_seen = n if self._n_seen is None else max(self._n_seen, n)

    def _apply(self, entries: list["StreamEntry"], replay: bool = False) -> None:
        """Train on entries / hold them out; `replay`: re-applied after a reload, their held-out
        examples are already in the guard's window."""
        train: list[Example] = []
        for e in entries:
            if self.config.only_arm and not in_arm(e.fields, self.config.only_arm):
                self.stats.events_other_arm += 1
                continue
            if e.fields.get(entry.TYPE) in EVENT_CODE and e.fields[entry.TYPE] not in self.config.target_types:
                self.stats.events_not_target += 1
                continue
            try:
                ex = example_from_entry(e)
            except ValueError as err:
                log.warning("skipping invalid stream entry: %s", err)
                self.stats.events_invalid += 1
                continue
            cap = self.config.max_items
            if cap > 0 and (ex.target > cap or (len(ex.seq) and int(ex.seq.max()) > cap)):
                if not self._warned_over_max_items:  # once: a flood of new items would flood the log
                    log.warning("skipping stream entries naming an item_idx above max_items %d (first: %s)",
                                cap, e.id)
                    self._warned_over_max_items = True
                self.stats.events_invalid += 1
                self.stats.events_over_max_items += 1
                continue
            if ex.item_id and ex.target > 0:
                self._items[ex.target] = ex.item_id
            if ex.target <= 0:
                self.stats.events_invalid += 1
            elif is_holdout(e.id, self.config.holdout_every, self.holdout_salt):
                if not replay:
                    self.guard.add(ex)
                self.stats.events_heldout += 1
            else:
                train.append(ex)
        self.stats.events_applied += len(entries)
        self.stats.events_trained += len(train)
        self._window_trained += len(train)
        self._batch.extend(train)
        full = len(self._batch) // self.config.batch_size * self.config.batch_size
        if full:
            self._train(full)

    def _train(self, count: int) -> None:
        """One gradient step per `batch_size` of the first `count` buffered examples. Steps wait
        for a full batch: a poll often brings a handful of events, and a step on 3 examples at
        lr 1e-3 is noise the guard then refuses (measured on the simulator, docs/EXPERIMENTS.md)."""
        assert self.trainer is not None
        batch, self._batch = self._batch[:count], self._batch[count:]
        self.trainer.step(batch)

    def _room(self) -> int:
        """How many more entries may be consumed before the checkpoint (max_uncommitted)."""
        if self.config.max_uncommitted <= 0:
            return self.config.read_count
        return self.config.max_uncommitted - len(self._uncommitted)

    def poll_once(self, block_ms: int | None = None) -> int:
        """Read one batch (unless paused by a rollback pin), train, publish when due. Returns #entries.

        With `max_uncommitted` entries waiting for a checkpoint (the registry failing), it reads
        nothing (`stats.backlogged`): it only retries the checkpoint, which re-raises a failure
        (the caller backs off) or, kept back by a pin or a conflict, waits block_ms."""
        wait_s = (block_ms if block_ms is not None else self.stream.config.block_ms) / 1000.0
        if self._check_pin():
            time.sleep(wait_s)
            return 0
        if self._room() <= 0:
            self.stats.backlogged = True
            self.checkpoint()
            if self._room() <= 0:
                time.sleep(wait_s)
                return 0
        self.stats.backlogged = False
        entries = self.stream.read(count=min(self.config.read_count, self._room()), block_ms=block_ms)
        n = self._consume(entries)
        if self._due():
            self.checkpoint()
        return n

    def _due(self) -> bool:
        if not self._uncommitted:
            return False
        return (len(self._uncommitted) >= self.config.publish_every_events
                or self.clock() - self._last_checkpoint >= self.config.publish_every_s)

    def _check_pin(self) -> bool:
        """True while LATEST is pinned; on release (or an outside publish) stand on LATEST again."""
        ptr = self.registry.pointer()
        if ptr is None:
            return False
        if ptr.pinned:
            self.stats.paused = True
            return True
        if ptr.version != self.stats.version:
            # rollback released, or someone published a version: continue from it, re-applying
            # the entries consumed since the last checkpoint (their effect was on the old weights)
            log.info("registry LATEST moved to v%s (was v%s): reloading", ptr.version, self.stats.version)
            pending = self._uncommitted
            self._uncommitted = []
            for k, v in self._checkpointed.items():  # re-counted by _apply, on the new weights
                setattr(self.stats, k, v)
            self._window_trained = 0
            self._stand_on(ptr.version)
            self._apply(pending, replay=True)
            self._uncommitted = pending
        self.stats.paused = False
        return False

    # ---------------------------------------------------------------- publishing
    def checkpoint(self) -> GuardResult | None:
        """Guard + publish (or refuse), write the trainer state, then ack what it covers.

        If it fails before their effect is kept (in the state file, or in a published version's
        meta), the entries stay consumed-but-uncheckpointed: applied, not acked, covered by the
        next checkpoint. A pin or a concurrent publish at the commit returns None; any other
        error is re-raised (the caller backs off and polls again).
        """
        if not self._uncommitted:
            return None
        assert self.trainer is not None
        from rerank.models.registry import RegistryPinned

        entries, self._uncommitted = self._uncommitted, []
        until = max(entries, key=lambda e: id_key(e.id)).id
        try:
            result = self._commit(entries, until)
        except RegistryPinned:  # a rollback pinned LATEST (or it moved) meanwhile: keep them for later
            self._uncommitted = entries + self._uncommitted
            return None
        except BaseException:  # the registry failed (e.g. OSError from S3): let the caller back off
            if self.stats.trained_until_id == until:
                # the version was published, only the state write failed: LATEST's meta is their
                # checkpoint (start() reads it), so they are done; the next checkpoint rewrites the state
                self._checkpointed = {k: getattr(self.stats, k) for k in COUNTERS}
                self._last_checkpoint = self.clock()
                self.stream.ack([e.id for e in entries])
            else:  # nothing of theirs is kept anywhere: they stay consumed-but-uncheckpointed
                self._uncommitted = entries + self._uncommitted
            raise
        self._checkpointed = {k: getattr(self.stats, k) for k in COUNTERS}
        self.stream.ack([e.id for e in entries])
        self._last_checkpoint = self.clock()
        return result

    def _commit(self, entries: list["StreamEntry"], until: str) -> GuardResult:
        """The checkpoint of `entries` (up to `until`); self.stats changes only once their effect is
        kept: a written state file, or a published version (see _publish). Buffered examples are
        trained first, so the checkpoint holds every entry it covers."""
        if self._batch:
            self._train(len(self._batch))
        if self._window_trained == 0:  # only held-out / invalid entries: nothing new to publish
            self._write_state(trained_until_id=until)
            self.stats.trained_until_id = until
            return GuardResult(True, "nothing trained")
        result = self.guard.check(self.trainer.model, self.serving)
        self.stats.last_guard = asdict(result)
        if result.ok:
            self._publish(until)
            if self.on_publish:
                now = self.clock()
                self.on_publish(self.stats.version, [now - stream_time_s(e.id) for e in entries])
            return result
        log.warning("guard refused the candidate: %s", result.reason)
        refused = {"guard_refusals": self.stats.guard_refusals + 1,
                   "events_refused": self.stats.events_refused + self._window_trained}
        self._write_state(trained_until_id=until, **refused)
        for k, v in refused.items():
            setattr(self.stats, k, v)
        self.stats.trained_until_id = until
        self.trainer.reset(copy.deepcopy(self.serving))
        self._window_trained = 0
        return result

    def _dataset_for_publish(self):
        """save_model's dataset: the serving version's item table plus items first seen online."""
        import pyarrow as pa

        from rerank.models.registry import dataset_shell

        base_dir = self.registry.local_dir(self.stats.version)
        shell = dataset_shell(base_dir)
        n_items = self.trainer.model.n_items
        have = shell.items.num_rows
        if n_items > have:
            idx = list(range(have + 1, n_items + 1))
            extra = pa.table({"item_idx": pa.array(idx, pa.int32()),
                              "item_id": pa.array([self._items.get(i, f"new-{i}") for i in idx], pa.string()),
                              "attributes": pa.array([[] for _ in idx], pa.list_(pa.int32()))})
            shell = dataset_shell(base_dir, pa.concat_tables([shell.items, extra.cast(shell.items.schema)]))
        return shell

    def _publish(self, until: str) -> int:
        """Publish the trainer's weights as a version covering entries up to `until`; write the state.

        Once the registry's publish succeeded the loop stands on the new version even if the state
        write then fails: LATEST's meta holds the same numbers and start() reads it when it is
        ahead of the state file, so checkpoint() still acks the entries (and re-raises)."""
        counters = {k: getattr(self.stats, k) for k in COUNTERS}
        counters["versions_published"] += 1
        n_items = self.trainer.model.n_items
        added = max(0, n_items - self._items_high)  # items no version this loop stood on had
        counters["items_added"] += added
        high = max(self._items_high, n_items)
        meta = {**counters, "trained_until_id": until, "trained_until": stream_time_s(until),
                "items_high": high, "n_until": self._n_seen, "guard": self.stats.last_guard}
        version = self.registry.publish(self.trainer.model, meta, dataset=self._dataset_for_publish())
        self.stats.versions_published += 1
        self.stats.items_added += added
        self._items_high = high
        self.stats.version = version
        self.stats.trained_until_id = until
        self.serving = copy.deepcopy(self.trainer.model)
        self.guard.accepted(self.serving)
        self.stats.last_publish_at = self.clock()
        self._window_trained = 0
        self._write_state()
        return version

    def _write_state(self, **overrides) -> None:
        """Write the checkpoint: self.stats with `overrides` (applied by the caller once written)."""
        state = {"version": self.stats.version, "trained_until_id": self.stats.trained_until_id,
                 "items_high": self._items_high, "n_until": self._n_seen,
                 **{k: getattr(self.stats, k) for k in COUNTERS}, **overrides,
                 "updated_at": self.clock()}
        self.registry.write_state(STATE_FILE, state)

    def lag(self) -> int:
        """Stream entries after the last checkpoint's trained_until_id."""
        return self.stream.behind(self.stats.trained_until_id, limit=10_000)

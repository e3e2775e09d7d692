"""The Redis key schema: every key of every subsystem, derived from one prefix here and nowhere else.

All keys of one service share its prefix `P` (DEFAULT_PREFIX "rr:"; a prefix with a hash tag, e.g.
"{rr}:", puts them in one Redis Cluster slot). `Keys(P)` names them; a method's argument may be
"*" to get a SCAN / KEYS pattern (`Keys(P).user_seq("*")` is every user's sequence).

    key                 Keys                  type    value                          written by (rerank.)
    P item_idx          .item_idx             hash    item_id -> item_idx, 1..       store.events, store.bulk_load
    P item_id           .item_id              hash    item_idx -> item_id            store.events, store.bulk_load
    P item_attrs        .item_attrs           hash    item_idx -> "3,17,42"          store.bulk_load
    P item_stats        .item_stats           hash    item_id -> ITEM_RECORD         store.events, store.bulk_load
    P next_item_idx     .next_item_idx        string  highest item_idx assigned      store.events, .bulk_load, .capacity
    P new_items:{min}   .new_items(minute)    string  new items admitted that minute store.events (TTL 120 s)
    P u:{user}:seq      .user_seq(user)       list    SEQ_RECORD, newest first       store.events, store.bulk_load
    P u:{user}:bought   .user_bought(user)    zset    item_idx -> last purchase ts   store.events, store.bulk_load
                                                      (the max_bought most recent; a plain set before the cap)
    P evt:{event_id}    .event(event_id)      string  idempotency marker             store.events
    P events            .events               stream  an applied event (store.entry) store.events
    P events:n          .events_seq           string  the events' entry counter      store.events
    P impressions       .impressions          stream  a /rank answer (Impression)    experiments.attribution
    P impressions:bytes .impressions_bytes    string  bytes of the impressions stream experiments.attribution
    P u:{user}:imps     .user_impressions(u)  list    recent request ids             experiments.attribution
    P u:{user}:shown    .user_shown(u)        hash    request_id -> what it showed   experiments.attribution
    P u:{user}:seen     .user_seen(u)         hash    item_id -> its newest showing  experiments.attribution
                                                      (the attribution index)
    P experiments       .experiments          hash    name -> experiment spec        experiments.book
    P trainer:lease     .trainer_lease        string  the online trainer's lease     store.lease (online trainer)
    P trainer:lease:{experiment}:{arm}  .arm_trainer_lease(e, a)  string  an arm's trainer's lease
    P sink:lease        .sink_lease           string  the Parquet sink's lease       store.lease (eventlog.sink)

Sizes, TTLs and the bounds of each are in rerank.store.feature_store's docstring; the binary value
layouts in rerank.store.layout; the stream entries' fields in rerank.store.entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PREFIX = "rr:"  # every key of a store starts with its prefix


@dataclass(frozen=True)
class Keys:
    """Key names for one prefix (see the module docstring)."""

    prefix: str = DEFAULT_PREFIX
    item_idx: str = field(init=False)
    item_id: str = field(init=False)
    item_attrs: str = field(init=False)
    item_stats: str = field(init=False)
    next_item_idx: str = field(init=False)
    events: str = field(init=False)
    events_seq: str = field(init=False)
    impressions: str = field(init=False)
    impressions_bytes: str = field(init=False)
    experiments: str = field(init=False)
    trainer_lease: str = field(init=False)
    sink_lease: str = field(init=False)

    def __post_init__(self) -> None:
        for name in ("item_idx", "item_id", "item_attrs", "item_stats", "next_item_idx", "events", "impressions",
                     "experiments"):
            object.__setattr__(self, name, self.prefix + name)
        object.__setattr__(self, "trainer_lease", self.prefix + "trainer:lease")
        object.__setattr__(self, "sink_lease", self.prefix + "sink:lease")
        object.__setattr__(self, "events_seq", self.prefix + "events:n")
        object.__setattr__(self, "impressions_bytes", self.prefix + "impressions:bytes")

    def arm_trainer_lease(self, experiment: str, arm: str) -> str:
        """The lease of an experiment arm's own online trainer."""
        return f"{self.prefix}trainer:lease:{experiment}:{arm}"

    def user_shown(self, user_id: str) -> str:
        """Hash of what the user's recent answers showed: request_id -> its shown list (rerank.experiments.attribution)."""
        return f"{self.prefix}u:{user_id}:shown"

    def user_impressions(self, user_id: str) -> str:
        """List of the user's recent request_ids, newest first (attribution by window)."""
        return f"{self.prefix}u:{user_id}:imps"

    def user_seen(self, user_id: str) -> str:
        """Hash item_id -> the newest of the user's recent answers that showed it (the attribution index)."""
        return f"{self.prefix}u:{user_id}:seen"

    def new_items(self, minute: int | str) -> str:
        """Count of new items admitted in one minute (the new-item rate), expiring after two."""
        return f"{self.prefix}new_items:{minute}"

    def user_seq(self, user_id: str) -> str:
        return f"{self.prefix}u:{user_id}:seq"

    def user_bought(self, user_id: str) -> str:
        return f"{self.prefix}u:{user_id}:bought"

    def event(self, event_id: str) -> str:
        return f"{self.prefix}evt:{event_id}"

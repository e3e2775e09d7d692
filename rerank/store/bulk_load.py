"""bulk_load: a Dataset's catalogue, item counters and user histories into the store, pipelined."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import redis

from rerank.data.dataset import EVENT_CODE
from rerank.infra.progress import progress_bar
from rerank.store.config import FeatureStoreConfig
from rerank.store.errors import UNAVAILABLE, FeatureStoreError, unavailable
from rerank.store.keys import Keys
from rerank.store.layout import ITEM_RECORD, SEQ_RECORD, STAT_FIELDS

if TYPE_CHECKING:
    from rerank.data.dataset import Dataset


def recent_purchases(idx: np.ndarray, typ: np.ndarray, ts: np.ndarray, keep: int) -> dict[int, float]:
    """The bought set of one user's events: item_idx -> ts of its latest purchase, the `keep` most recent."""
    purchase = typ == EVENT_CODE["purchase"]
    latest: dict[int, float] = {}
    for i, t in zip(idx[purchase].tolist(), ts[purchase].tolist()):
        latest[i] = max(t, latest.get(i, t))
    if len(latest) > keep:
        latest = dict(sorted(latest.items(), key=lambda kv: kv[1])[-keep:])
    return latest


def bulk_load(client: redis.Redis, keys: Keys, cfg: FeatureStoreConfig, url: str, dataset: "Dataset",
              progress: bool = True, batch: int = 5000, drop_last: int = 0) -> dict:
    """FeatureStore.bulk_load (see there)."""
    if drop_last < 0:
        raise ValueError(f"drop_last must be >= 0, got {drop_last}")
    start = time.perf_counter()
    item_ids = dataset.item_ids
    n_items = dataset.n_items
    try:
        position = {item_id: i for i, item_id in enumerate(item_ids) if i > 0}
        for item_id, idx in client.hgetall(keys.item_idx).items():
            item_id, idx = item_id.decode(), int(idx)
            if position.get(item_id, 0) != idx and (item_id in position or idx <= n_items):
                raise FeatureStoreError(
                    f"{keys.item_idx}: item {item_id!r} has idx {idx} in Redis but "
                    f"{position.get(item_id, 'none')} in {dataset.path}; flush the store "
                    f"(prefix {cfg.prefix!r}) before loading this dataset"
                )
        seqs, types, stamps = dataset.sequences, dataset.event_type_sequences, dataset.timestamp_sequences
        kept = [slice(0, max(0, len(s) - drop_last)) for s in seqs]
        # item counters over the loaded events (events are sorted by user: keep a prefix of each)
        lengths = np.array([len(s) for s in seqs])
        start_of = np.repeat(np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        keep = (np.arange(lengths.sum()) - start_of) < np.repeat(lengths - drop_last, lengths)
        ev_idx = np.concatenate(seqs)[keep].astype(np.int64)
        ev_type = np.concatenate(types)[keep].astype(np.int64)
        ev_ts = np.concatenate(stamps)[keep].astype(np.float64)
        counts = np.zeros((n_items + 1, 4), dtype=np.int64)
        np.add.at(counts, (ev_idx, ev_type - 1), 1)
        last_ts = np.zeros(n_items + 1, dtype=np.float64)
        np.maximum.at(last_ts, ev_idx, ev_ts)
        records = np.zeros(n_items + 1, dtype=ITEM_RECORD)
        records["idx"] = np.arange(n_items + 1)
        for j, name in enumerate(STAT_FIELDS):
            records[name] = counts[:, j]
        records["last_ts"] = last_ts
        attrs = dataset.item_attributes
        bar = progress_bar(total=n_items + dataset.n_users, desc="feature store", unit="key", enabled=progress)
        for lo in range(1, n_items + 1, batch):
            hi = min(lo + batch, n_items + 1)
            pipe = client.pipeline(transaction=False)
            pipe.hset(keys.item_idx, mapping={item_ids[i]: i for i in range(lo, hi)})
            pipe.hset(keys.item_id, mapping={i: item_ids[i] for i in range(lo, hi)})
            pipe.hset(keys.item_attrs, mapping={i: ",".join(map(str, attrs[i][attrs[i] > 0])) for i in range(lo, hi)})
            pipe.hset(keys.item_stats, mapping={item_ids[i]: records[i].tobytes() for i in range(lo, hi)})
            pipe.execute()
            bar.update(hi - lo)
        top = int(client.get(keys.next_item_idx) or 0)
        if top < n_items:
            client.set(keys.next_item_idx, n_items)
        user_ids = dataset.user_ids
        n_events = 0
        for lo in range(1, dataset.n_users + 1, batch):
            hi = min(lo + batch, dataset.n_users + 1)
            pipe = client.pipeline(transaction=False)
            for u in range(lo, hi):
                seq_key, bought_key = keys.user_seq(user_ids[u]), keys.user_bought(user_ids[u])
                pipe.delete(seq_key, bought_key)
                idx, typ, ts = seqs[u][kept[u]], types[u][kept[u]], stamps[u][kept[u]]
                n_events += len(idx)
                recent = slice(max(0, len(idx) - cfg.max_history), len(idx))
                rec = np.zeros(len(idx[recent]), dtype=SEQ_RECORD)
                rec["idx"], rec["type"], rec["ts"] = idx[recent], typ[recent], ts[recent]
                raw = rec[::-1].tobytes()
                size = SEQ_RECORD.itemsize
                if len(rec):
                    pipe.rpush(seq_key, *[raw[i : i + size] for i in range(0, len(raw), size)])
                    pipe.expire(seq_key, cfg.user_ttl_s)
                bought = recent_purchases(idx, typ, ts, cfg.max_bought)
                if bought:
                    pipe.zadd(bought_key, bought)
                    pipe.expire(bought_key, cfg.user_ttl_s)
            pipe.execute()
            bar.update(hi - lo)
        bar.close()
    except UNAVAILABLE as err:
        raise unavailable(url, err, "bulk_load") from err
    return {
        "users": dataset.n_users,
        "items": n_items,
        "events": n_events,
        "seconds": round(time.perf_counter() - start, 3),
    }

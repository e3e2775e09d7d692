"""Prequential (test-then-train) evaluation of real-time features and online updates, in one process.

Protocol: events are ordered by time; the first `train_fraction` of them (by timestamp, ties
kept together) train an offline model; the rest are replayed in time order, and every replayed
event is first PREDICTED (full ranking over the catalogue, the items the system knows the user
already had are masked, the event's item is the target), then revealed. Three systems:

  (a) static   the offline model, user histories frozen at the split (features never update);
  (b) features the offline model, histories grow as events are revealed (real-time features);
  (c) online   as (b), and the model keeps learning: revealed events become next-item examples
               (pre-event history -> item) for `IncrementalTrainer` exactly as the online trainer
               does it (1 in `holdout_every` held out for the publish guard, never trained on;
               the guard checks each candidate before it replaces the serving weights).

Diagnostic `static_live_mask`: (a)'s scores ranked with (b)'s mask (items revealed since the
split excluded), which separates the two things real-time features give (b): knowing what the
user already has (masking) and conditioning the model on the latest context.

Replay is in chunks of `chunk` events (the model is fixed within a chunk, as serving weights
lag the stream by one publish interval); within a chunk each event still sees every event
revealed before it in its history. Metrics: HR@10 / NDCG@10 over all replayed events, and per
time window for the plot. No Ray, no Redis: this is the model-level protocol.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rerank.data.dataset import EVENT_CODE, Dataset
from rerank.infra.progress import progress_bar
from rerank.online.config import OnlineConfig
from rerank.online.examples import Example, is_holdout
from rerank.online.guard import PublishGuard
from rerank.online.trainer import IncrementalTrainer

SYSTEMS = ("static", "features", "online")
# diagnostic: (a)'s scores with (b)'s mask, to separate "knows what to exclude" from "knows the context"
DIAGNOSTICS = ("static_live_mask",)


@dataclass
class PrequentialConfig:
    train_fraction: float = 0.8
    chunk: int = 64  # events per replay step (the model is fixed within one)
    windows: int = 10  # time windows for the plot
    k: int = 10
    max_len: int = 50
    online: OnlineConfig = field(default_factory=lambda: OnlineConfig(lr=1e-4, batch_size=64))
    seed: int = 0
    progress: bool = True


def time_split(dataset: Dataset, fraction: float) -> tuple[np.ndarray, float]:
    """(train mask over dataset.events, split timestamp): events with ts <= the split time train."""
    ts = dataset.events["ts"].to_numpy()
    split_ts = float(np.quantile(ts, fraction, method="lower"))
    return ts <= split_ts, split_ts


def train_dataset(dataset: Dataset, mask: np.ndarray) -> Dataset:
    """The same catalogue and users, only the events before the split (for offline training)."""
    events = dataset.events.filter(pa.array(mask))
    meta = {**dataset.meta, "n_events": events.num_rows, "name": dataset.meta.get("name", "") + "-prequential-train"}
    return Dataset(dataset.path, meta, dataset.users, dataset.items, events)


def _rank_of_targets(scores: np.ndarray, targets: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """Rank (0 = best) of each target among all items with prefix items masked; -inf rows -> miss."""
    scores = scores.copy()
    scores[:, 0] = -np.inf
    for row, m in enumerate(masks):
        scores[row, m] = -np.inf
    target_scores = scores[np.arange(len(targets)), targets]
    ranks = (scores > target_scores[:, None]).sum(axis=1)
    ranks[~np.isfinite(target_scores)] = scores.shape[1]  # target masked (a repeat) or invalid: a miss
    return ranks


@dataclass
class SystemResult:
    ranks: list[np.ndarray] = field(default_factory=list)
    ts: list[np.ndarray] = field(default_factory=list)

    def metrics(self, k: int) -> dict:
        r = np.concatenate(self.ranks)
        hit = r < k
        return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean()),
                "mrr": float((1.0 / (r + 1.0)).mean()), "events": int(len(r))}


def run_prequential(dataset: Dataset, model, config: PrequentialConfig) -> dict:
    """Replay the test period against (a) static, (b) real-time features, (c) online updates.

    `model` is a trained SequentialRecommender (trained on `train_dataset(...)`); it is not
    modified (the online system trains a copy). Returns a JSON-able summary with per-window rows.
    """
    torch.manual_seed(config.seed)
    mask, split_ts = time_split(dataset, config.train_fraction)
    ev = dataset.events
    users = ev["user_idx"].to_numpy()
    items = ev["item_idx"].to_numpy().astype(np.int64)
    types = (pc.index_in(ev["event_type"], pa.array(list(EVENT_CODE))).to_numpy(zero_copy_only=False) + 1).astype(np.int64)
    ts = ev["ts"].to_numpy()
    # replay order: by time, then by the dataset's per-user order for ties
    test_rows = np.flatnonzero(~mask)
    test_rows = test_rows[np.lexsort((test_rows, ts[test_rows]))]
    # per user histories at the split (dataset events are sorted by (user, ts))
    frozen: dict[int, list[int]] = {}
    frozen_types: dict[int, list[int]] = {}
    for row in np.flatnonzero(mask):
        frozen.setdefault(int(users[row]), []).append(int(items[row]))
        frozen_types.setdefault(int(users[row]), []).append(int(types[row]))
    live = {u: list(h) for u, h in frozen.items()}
    live_types = {u: list(t) for u, t in frozen_types.items()}

    online_model = copy.deepcopy(model)
    trainer = IncrementalTrainer(online_model, config.online)
    guard = PublishGuard(config.online)
    serving_online = copy.deepcopy(online_model)  # what (c) predicts with: the last published weights
    results = {name: SystemResult() for name in SYSTEMS + DIAGNOSTICS}
    stats = {"published": 0, "refused": 0, "trained": 0, "heldout": 0}
    L = config.max_len
    start = time.monotonic()
    chunks = range(0, len(test_rows), config.chunk)
    bar = progress_bar(chunks, desc="prequential", enabled=config.progress, mininterval=1.0)
    for lo in bar:
        rows = test_rows[lo : lo + config.chunk]
        targets = items[rows]
        hist_frozen, types_frozen, hist_live, types_live, examples = [], [], [], [], []
        for row in rows:
            u = int(users[row])
            hf, tf = frozen.get(u, []), frozen_types.get(u, [])
            hl, tl = live.setdefault(u, []), live_types.setdefault(u, [])
            hist_frozen.append(np.asarray(hf[-L:], dtype=np.int64))
            types_frozen.append(np.asarray(tf[-L:], dtype=np.int64))
            hist_live.append(np.asarray(hl, dtype=np.int64))
            types_live.append(np.asarray(tl, dtype=np.int64))
            examples.append(Example(np.asarray(hl[-L:], np.int64), np.asarray(tl[-L:], np.int64),
                                    int(items[row]), int(types[row]), event_id=f"row{row}"))
            hl.append(int(items[row]))  # revealed: the next event of this user sees it
            tl.append(int(types[row]))
        masks_frozen = [np.asarray(frozen.get(int(users[r]), []), dtype=np.int64) for r in rows]
        masks_live = hist_live
        short_live = [h[-L:] for h in hist_live]
        short_types = [t[-L:] for t in types_live]
        s_static = model.score(hist_frozen, event_types=types_frozen)
        s_feat = model.score(short_live, event_types=short_types)
        s_online = serving_online.score(short_live, event_types=short_types)
        for name, scores, masks in (("static", s_static, masks_frozen), ("features", s_feat, masks_live),
                                    ("online", s_online, masks_live), ("static_live_mask", s_static, masks_live)):
            results[name].ranks.append(_rank_of_targets(scores, targets, masks))
            results[name].ts.append(ts[rows])
        # reveal: the online system learns from the chunk, then publishes through the guard
        train = []
        for ex in examples:
            if is_holdout(ex.event_id, config.online.holdout_every):
                guard.add(ex)
                stats["heldout"] += 1
            elif len(ex.seq):
                train.append(ex)
        if train:
            trainer.step(train)
            stats["trained"] += len(train)
            verdict = guard.check(trainer.model, serving_online)
            if verdict.ok:
                serving_online = copy.deepcopy(trainer.model)
                guard.accepted(serving_online)
                stats["published"] += 1
            else:
                stats["refused"] += 1
                trainer.reset(copy.deepcopy(serving_online))
    bar.close()

    k = config.k
    all_ts = np.concatenate(results["static"].ts)
    edges = np.quantile(all_ts, np.linspace(0, 1, config.windows + 1))
    window_rows = []
    for w in range(config.windows):
        lo_t, hi_t = edges[w], edges[w + 1]
        sel = (all_ts >= lo_t) & ((all_ts < hi_t) if w < config.windows - 1 else (all_ts <= hi_t))
        row = {"window": w, "start_ts": float(lo_t), "end_ts": float(hi_t), "events": int(sel.sum())}
        for name in SYSTEMS:
            r = np.concatenate(results[name].ranks)[sel]
            hit = r < k
            row[f"{name}_ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean()) if len(r) else math.nan
        window_rows.append(row)
    summary = {
        "dataset": dataset.meta.get("name"),
        "split_ts": split_ts,
        "train_events": int(mask.sum()),
        "replayed_events": int(len(test_rows)),
        "config": {**{k_: v for k_, v in asdict(config).items() if k_ != "online"}, "online": asdict(config.online)},
        "systems": {name: results[name].metrics(k) for name in SYSTEMS},
        "diagnostics": {name: results[name].metrics(k) for name in DIAGNOSTICS},
        "online_stats": stats,
        "windows": window_rows,
        "seconds": round(time.monotonic() - start, 1),
    }
    base = summary["systems"]
    summary["gaps"] = {
        f"features_vs_static_ndcg@{k}": base["features"][f"ndcg@{k}"] - base["static"][f"ndcg@{k}"],
        f"online_vs_features_ndcg@{k}": base["online"][f"ndcg@{k}"] - base["features"][f"ndcg@{k}"],
    }
    return summary


def plot_windows(summary: dict, path, k: int = 10) -> None:
    """NDCG@k per time window for the three systems (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["windows"]
    x = [r["window"] + 1 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = {"static": "(a) static model, frozen features", "features": "(b) static model, real-time features",
              "online": "(c) real-time features + online updates"}
    for name in SYSTEMS:
        ax.plot(x, [r[f"{name}_ndcg@{k}"] for r in rows], marker="o", label=labels[name])
    ax.set_xlabel("time window of the replayed period (equal event counts)")
    ax.set_ylabel(f"NDCG@{k}")
    ax.set_title(f"Prequential replay: {summary.get('dataset')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

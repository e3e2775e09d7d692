"""Hybrid: the sequential transformer blended with item-item co-occurrence, as probabilities.

The two models are wrong in different ways: SASRec generalises over sequences, ItemKNN
remembers exact "bought next" pairs. Both are turned into a distribution over the items the
user has not interacted with yet, and mixed:

    p = softmax(sasrec logits over unseen items)          (B, N+1)
    q = knn scores / their sum over unseen items          (B, N+1)
    score = (1 - w) * p + w * q

`w` (`knn_weight`) is picked on a subset of the validation split after both parts are trained
(never on test). Training runs ItemKNN first (seconds), then SASRec with the rest of the
wall-clock budget `max_minutes`. Options prefixed `knn_` go to ItemKNN, the rest to SASRec.
The online trainer updates only `kind: sasrec` models; serve a hybrid as a static model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from rerank.models.baselines import ItemKNN
from rerank.models.metrics import metrics_from_ranks, target_ranks
from rerank.models.recommender import Recommender, register_model, take_candidates
from rerank.models.sequential import SequentialRecommender

if TYPE_CHECKING:
    from rerank.data.dataset import Dataset, LeaveOneOut
    from rerank.models.train_log import TrainLog

WEIGHT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
TUNE_RESERVE_MINUTES = 0.75  # kept out of the SASRec budget for picking the weight and saving


@register_model("hybrid")
class HybridRecommender(Recommender):
    def __init__(self, sasrec: SequentialRecommender, itemknn: ItemKNN, knn_weight: float | None = None,
                 max_minutes: float = 13.5, tune_users: int = 8000, seed: int = 0) -> None:
        self.sasrec, self.itemknn = sasrec, itemknn
        self.knn_weight = knn_weight  # None until fit picks it on validation
        self.max_minutes, self.tune_users, self.seed = max_minutes, tune_users, seed

    @property
    def n_items(self) -> int:  # type: ignore[override]
        return self.sasrec.n_items

    @classmethod
    def create(cls, dataset: Dataset, seed: int = 0, **options: Any) -> "HybridRecommender":
        own = {k: options.pop(k) for k in ("knn_weight", "tune_users", "max_minutes") if k in options}
        knn_options = {k[len("knn_"):]: options.pop(k) for k in list(options) if k.startswith("knn_")}
        max_minutes = float(own.get("max_minutes", 13.5))
        sasrec = SequentialRecommender.create(dataset, seed, max_minutes=max_minutes, **options)
        weight = own.get("knn_weight")
        return cls(sasrec, ItemKNN.create(dataset, seed, **knn_options),
                   None if weight is None else float(weight), max_minutes, int(own.get("tune_users", 8000)), seed)

    # ---- training ------------------------------------------------------------------------------

    def fit(self, dataset: Dataset, split: LeaveOneOut, log: TrainLog | None = None) -> None:
        start = time.monotonic()
        self.itemknn.fit(dataset, split, log)
        knn_minutes = (time.monotonic() - start) / 60
        if log is not None:
            log.log(event="itemknn_done", seconds=round(knn_minutes * 60, 2))
        if self.max_minutes > 0:  # the rest of the budget goes to the transformer
            self.sasrec.train_config.max_minutes = max(0.5, self.max_minutes - knn_minutes - TUNE_RESERVE_MINUTES)
        self.sasrec.fit(dataset, split, log)
        if self.knn_weight is None:
            self.knn_weight, table = self._tune_weight(dataset, split)
            if log is not None:
                log.log(event="knn_weight", knn_weight=self.knn_weight, valid_ndcg10_by_weight=table)

    def _tune_weight(self, dataset: Dataset, split: LeaveOneOut) -> tuple[float, dict[str, float]]:
        """The grid weight with the best validation NDCG@10 on a fixed random subset of users."""
        rng = np.random.default_rng(self.seed)
        users = split.users
        if len(users) > self.tune_users:
            users = np.sort(rng.choice(users, self.tune_users, replace=False))
        ranks: dict[float, list[np.ndarray]] = {w: [] for w in WEIGHT_GRID}
        for lo in range(0, len(users), 1024):
            batch = users[lo : lo + 1024]
            hist = [dataset.sequences[u][:-2] for u in batch]
            types = [dataset.event_type_sequences[u][:-2] for u in batch]
            p, q, seen = self._parts(hist, types)
            for w in WEIGHT_GRID:
                blended = ((1 - w) * p + w * q).masked_fill(seen, -torch.inf)
                ranks[w].append(target_ranks(blended, split.valid_target[batch]))
        table = {str(w): metrics_from_ranks(np.concatenate(r), (10,))["ndcg@10"] for w, r in ranks.items()}
        best = max(WEIGHT_GRID, key=lambda w: table[str(w)])
        return float(best), table

    # ---- scoring -------------------------------------------------------------------------------

    def _parts(self, histories: Sequence[np.ndarray], event_types: Sequence[np.ndarray] | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(p, q, seen): both models as distributions over unseen items, and the seen mask (B, N+1)."""
        logits = torch.from_numpy(self.sasrec.score(histories, None, event_types)).float()  # (B, N+1)
        knn = torch.from_numpy(self.itemknn.score(histories, None, event_types)).float().clamp_min(0)
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[:, 0] = True
        lengths = [len(h) for h in histories]
        if sum(lengths):
            rows = torch.from_numpy(np.repeat(np.arange(len(histories)), lengths))
            seen[rows, torch.from_numpy(np.concatenate(histories).astype(np.int64))] = True
        log_z = torch.logsumexp(logits.masked_fill(seen, -torch.inf), dim=1, keepdim=True)
        p = torch.exp(logits - log_z)  # seen items keep a score too: the caller decides on masking
        mass = knn.masked_fill(seen, 0).sum(dim=1, keepdim=True)
        q = knn / mass.clamp_min(1e-12)
        return p, q, seen

    def score(self, histories: Sequence[np.ndarray], candidates: np.ndarray | None = None,
              event_types: Sequence[np.ndarray] | None = None) -> np.ndarray:
        w = 0.0 if self.knn_weight is None else self.knn_weight
        p, q, _ = self._parts(histories, event_types)
        full = ((1 - w) * p + w * q).numpy()
        full[:, 0] = -np.inf
        return take_candidates(full, candidates)

    def to(self, device: str | torch.device) -> "HybridRecommender":
        self.sasrec.to(device)
        return self

    # ---- persistence ---------------------------------------------------------------------------

    def save_weights(self, path: Path) -> dict:
        parts = {}
        for name, model in (("sasrec", self.sasrec), ("itemknn", self.itemknn)):
            (Path(path) / name).mkdir()
            parts[name] = model.save_weights(Path(path) / name)
        return {"knn_weight": self.knn_weight, "max_minutes": self.max_minutes, "parts": parts}

    @classmethod
    def load_weights(cls, path: Path, config: dict) -> "HybridRecommender":
        parts = config["parts"]
        sasrec = SequentialRecommender.load_weights(Path(path) / "sasrec", parts["sasrec"])
        itemknn = ItemKNN.load_weights(Path(path) / "itemknn", parts["itemknn"])
        if itemknn.n_items != sasrec.n_items:
            raise ValueError(f"parts disagree on n_items: sasrec {sasrec.n_items}, itemknn {itemknn.n_items}")
        return cls(sasrec, itemknn, config.get("knn_weight"), config.get("max_minutes", 0.0))

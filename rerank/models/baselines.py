"""Non-sequential baselines: time-decayed popularity, item-item KNN, implicit-ALS matrix factorisation.

All three score from a history of item_idx alone (no user id), so they serve new users and
fresh histories: ItemKNN sums neighbour similarities, MF folds a user vector in from the
history by a least-squares solve against the item factors. All train on `split.train` only.
Defaults are the best settings found on Beauty's validation split (see the report /
benchmarks/baselines.py).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from rerank.models.recommender import Recommender, register_model, take_candidates

if TYPE_CHECKING:
    from typing_extensions import Self

    from rerank.data.dataset import Dataset, LeaveOneOut
    from rerank.models.train_log import TrainLog

WEIGHTS_FILE = "weights.npz"


def _build_config(config_cls: type, kind: str, options: dict[str, Any]):
    """A config dataclass from CLI options; ValueError naming any option the model does not take."""
    names = {f.name: f for f in fields(config_cls)}
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"model {kind!r} does not take option(s) {', '.join(unknown)} (takes: {', '.join(names)})")
    values = {}
    for key, value in options.items():
        default = getattr(config_cls, key, None)
        if isinstance(default, bool):
            values[key] = bool(value)
        elif isinstance(default, int) and not isinstance(value, bool):
            values[key] = int(value)
        elif isinstance(default, float):
            values[key] = float(value)
        else:
            values[key] = value
    return config_cls(**values)


def _recency_weights(length: int, half_life: float) -> np.ndarray:
    """Weights 0.5 ** (distance from the end / half_life) for a history of `length`; 1s when half_life <= 0."""
    if half_life <= 0:
        return np.ones(length, dtype=np.float32)
    distance = np.arange(length - 1, -1, -1, dtype=np.float32)
    return (0.5 ** (distance / half_life)).astype(np.float32)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    np.savez(path / WEIGHTS_FILE, **arrays)


def _load_npz(path: Path, *names: str) -> dict[str, np.ndarray]:
    with np.load(path / WEIGHTS_FILE, allow_pickle=False) as data:
        missing = [n for n in names if n not in data.files]
        if missing:
            raise ValueError(f"{path / WEIGHTS_FILE}: arrays {missing} missing")
        return {n: data[n] for n in names}


# --------------------------------------------------------------------------------------------
# Popularity


@dataclass
class PopularityConfig:
    """Exponentially decayed counts. With timestamps: weight 0.5 ** (age / half_life_days), age
    from the latest training event; without: 0.5 ** (position from the end of the user's
    training sequence / half_life). 0 = plain counts."""

    half_life: float = 2.0  # events (datasets without timestamps)
    half_life_days: float = 30.0  # days (datasets with timestamps)


@register_model("pop")
class Popularity(Recommender):
    """Most popular items (exponentially time-decayed counts); ignores the history except masking."""

    def __init__(self, n_items: int, config: PopularityConfig, counts: np.ndarray | None = None) -> None:
        self.n_items = n_items
        self.config = config
        self.counts = counts if counts is not None else np.zeros(n_items + 1, dtype=np.float32)

    @classmethod
    def create(cls, dataset: Dataset, seed: int = 0, **options: Any) -> Self:
        return cls(dataset.n_items, _build_config(PopularityConfig, "pop", options))

    def fit(self, dataset: Dataset, split: LeaveOneOut, log: TrainLog | None = None) -> None:
        items = np.concatenate(split.train) if split.train else np.zeros(0, dtype=np.int32)
        hl = self.config.half_life_days * 86400.0 if dataset.has_timestamps else self.config.half_life
        if hl <= 0:
            weights = np.ones(len(items), dtype=np.float64)
        elif dataset.has_timestamps:
            n_train = [len(t) for t in split.train]
            ts = np.concatenate([dataset.timestamp_sequences[u][:n] for u, n in enumerate(n_train)])
            weights = 0.5 ** ((ts.max() - ts) / hl) if len(ts) else ts.astype(np.float64)
        else:
            weights = np.concatenate([_recency_weights(len(t), hl) for t in split.train]).astype(np.float64)
        self.counts = np.bincount(items, weights=weights, minlength=self.n_items + 1).astype(np.float32)
        if log is not None:
            log.log(event="fit", items_seen=int((self.counts[1:] > 0).sum()))

    def score(self, histories: Sequence[np.ndarray], candidates: np.ndarray | None = None,
              event_types: Sequence[np.ndarray] | None = None) -> np.ndarray:
        full = np.broadcast_to(self.counts, (len(histories), self.n_items + 1)).copy()
        full[:, 0] = -np.inf
        return take_candidates(full, candidates)

    def save_weights(self, path: Path) -> dict:
        _save_npz(path, counts=self.counts)
        return asdict(self.config)

    @classmethod
    def load_weights(cls, path: Path, config: dict) -> Self:
        counts = _load_npz(path, "counts")["counts"]
        return cls(len(counts) - 1, _build_config(PopularityConfig, "pop", _own(config, PopularityConfig)), counts)


def _own(config: dict, config_cls: type) -> dict:
    """The keys of a saved config.json that belong to `config_cls`."""
    names = {f.name for f in fields(config_cls)}
    return {k: v for k, v in config.items() if k in names}


# --------------------------------------------------------------------------------------------
# Item-item KNN


@dataclass
class ItemKNNConfig:
    """Item-item cosine similarity over training sequences with shrinkage and top-k neighbours.

    window: only pairs at most this many positions apart co-occur (0 = the whole sequence);
    distance_decay: co-occurrence weight 1 / distance ** distance_decay (0 = unweighted);
    recent_half_life: at score time, history item weights 0.5 ** (position from end / half life).
    """

    neighbours: int = 100
    shrink: float = 30.0
    alpha: float = 0.75  # asymmetric cosine: n_i ** alpha * n_j ** (1 - alpha); 0.5 = cosine
    window: int = 0
    distance_decay: float = 1.0
    recent_half_life: float = 1.5
    backward_weight: float = 0.25  # weight of a neighbour that came BEFORE the item (1 = symmetric)
    max_history: int = 200  # most recent training items per user used for co-occurrence


@register_model("itemknn")
class ItemKNN(Recommender):
    """score(j | history) = sum_h w_h * sim(h, j) over the top-k neighbours of each history item h."""

    def __init__(self, n_items: int, config: ItemKNNConfig, indptr: np.ndarray | None = None,
                 indices: np.ndarray | None = None, values: np.ndarray | None = None,
                 popularity: np.ndarray | None = None) -> None:
        self.n_items = n_items
        self.config = config
        self.indptr = indptr if indptr is not None else np.zeros(n_items + 2, dtype=np.int64)
        self.indices = indices if indices is not None else np.zeros(0, dtype=np.int32)
        self.values = values if values is not None else np.zeros(0, dtype=np.float32)
        self.popularity = popularity if popularity is not None else np.zeros(n_items + 1, dtype=np.float32)
        self._matrix_t: torch.Tensor | None = None

    @classmethod
    def create(cls, dataset: Dataset, seed: int = 0, **options: Any) -> Self:
        return cls(dataset.n_items, _build_config(ItemKNNConfig, "itemknn", options))

    def fit(self, dataset: Dataset, split: LeaveOneOut, log: TrainLog | None = None) -> None:
        cfg, n = self.config, self.n_items + 1
        seqs = [s[-cfg.max_history:] for s in split.train if len(s)]
        counts = np.zeros(n, dtype=np.float64)
        for s in seqs:
            counts[np.unique(s)] += 1
        self.popularity = (counts / max(counts.max(), 1.0)).astype(np.float32)
        pair_keys, pair_weights = [], []
        for s in seqs:
            L = len(s)
            if L < 2:
                continue
            i, j = np.triu_indices(L, k=1)
            dist = (j - i).astype(np.float64)
            keep = dist <= cfg.window if cfg.window > 0 else slice(None)
            i, j, dist = i[keep], j[keep], dist[keep]
            a, b = s[i].astype(np.int64), s[j].astype(np.int64)
            w = dist ** -cfg.distance_decay if cfg.distance_decay else np.ones(len(i))
            same = a != b
            pair_keys += [a[same] * n + b[same], b[same] * n + a[same]]  # b after a; a before b
            pair_weights += [w[same], cfg.backward_weight * w[same]]
        if pair_keys:
            keys = np.concatenate(pair_keys)
            weights = np.concatenate(pair_weights)
            uniq, inverse = np.unique(keys, return_inverse=True)
            co = np.bincount(inverse, weights=weights)
        else:
            uniq, co = np.zeros(0, dtype=np.int64), np.zeros(0)
        rows, cols = uniq // n, uniq % n
        denom = counts[rows] ** cfg.alpha * counts[cols] ** (1 - cfg.alpha) + cfg.shrink
        sim = co / denom
        # top-k neighbours per row: sort by (row, -sim), keep the first k of each row
        order = np.lexsort((-sim, rows))
        rows, cols, sim = rows[order], cols[order], sim[order]
        row_start = np.searchsorted(rows, np.arange(n))
        rank_in_row = np.arange(len(rows)) - row_start[rows]
        keep = rank_in_row < cfg.neighbours
        rows, cols, sim = rows[keep], cols[keep], sim[keep]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64)
        self.indices = cols.astype(np.int32)
        self.values = sim.astype(np.float32)
        self._matrix_t = None
        if log is not None:
            log.log(event="fit", pairs=int(len(uniq)), neighbours_kept=int(len(cols)))

    def _similarity_t(self) -> torch.Tensor:
        """The transposed (n+1, n+1) sparse similarity matrix (CSR), built once."""
        if self._matrix_t is None:
            n = self.n_items + 1
            rows = np.repeat(np.arange(n), np.diff(self.indptr))
            coo = torch.sparse_coo_tensor(
                torch.from_numpy(np.stack([self.indices.astype(np.int64), rows])),
                torch.from_numpy(self.values), (n, n), check_invariants=True,
            ).coalesce()
            with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what we want here
                warnings.simplefilter("ignore", UserWarning)
                self._matrix_t = coo.to_sparse_csr()
        return self._matrix_t

    def score(self, histories: Sequence[np.ndarray], candidates: np.ndarray | None = None,
              event_types: Sequence[np.ndarray] | None = None) -> np.ndarray:
        n, B = self.n_items + 1, len(histories)
        weights_t = np.zeros((n, B), dtype=np.float32)  # history weights, one column per user
        for b, h in enumerate(histories):
            h = np.asarray(h, dtype=np.int64)
            h = h[(h > 0) & (h < n)]
            np.add.at(weights_t[:, b], h, _recency_weights(len(h), self.config.recent_half_life))
        full = torch.sparse.mm(self._similarity_t(), torch.from_numpy(weights_t)).T.numpy()
        # popularity breaks ties among items without any neighbour evidence (far below any similarity)
        full = full + 1e-6 * self.popularity[None, :]
        full[:, 0] = -np.inf
        return take_candidates(full, candidates)

    def save_weights(self, path: Path) -> dict:
        _save_npz(path, indptr=self.indptr, indices=self.indices, values=self.values, popularity=self.popularity)
        return asdict(self.config)

    @classmethod
    def load_weights(cls, path: Path, config: dict) -> Self:
        w = _load_npz(path, "indptr", "indices", "values", "popularity")
        n_items = len(w["indptr"]) - 2
        if len(w["popularity"]) != n_items + 1 or w["indptr"][-1] != len(w["indices"]) != len(w["values"]):
            raise ValueError(f"{path / WEIGHTS_FILE}: inconsistent array lengths")
        return cls(n_items, _build_config(ItemKNNConfig, "itemknn", _own(config, ItemKNNConfig)),
                   w["indptr"], w["indices"], w["values"], w["popularity"])


# --------------------------------------------------------------------------------------------
# Matrix factorisation (implicit ALS with fold-in)


@dataclass
class MFConfig:
    """Implicit ALS (Hu, Koren & Volinsky 2008): confidence 1 + alpha * r, L2 `reg`.

    epochs: ALS sweeps (early stopping on validation NDCG@10 with `patience`);
    recent_half_life: history items' confidence decays with their position from the end,
    in training and at fold-in (0 = off); max_history: most recent items used per user.
    """

    factors: int = 64
    reg: float = 5.0
    alpha: float = 20.0
    epochs: int = 15
    patience: int = 3
    recent_half_life: float = 2.0
    max_history: int = 200
    init_std: float = 0.01
    eval_users: int = 5000  # validation users for early stopping (a fixed random subset; 0 = all)
    max_minutes: float = 0.0  # wall-clock budget for fit (0 = none)


@register_model("mf")
class MatrixFactorization(Recommender):
    """Item factors from implicit ALS; a user vector is folded in from the history at score time."""

    def __init__(self, n_items: int, config: MFConfig, item_factors: np.ndarray | None = None,
                 seed: int = 0) -> None:
        self.n_items = n_items
        self.config = config
        self.seed = seed
        if item_factors is None:
            rng = np.random.default_rng(seed)
            item_factors = (rng.standard_normal((n_items + 1, config.factors)) * config.init_std).astype(np.float32)
            item_factors[0] = 0.0
        self.item_factors = torch.from_numpy(np.ascontiguousarray(item_factors, dtype=np.float32))
        self._gram: torch.Tensor | None = None  # reg * I + Y^T Y of the current item factors, for fold-in

    @classmethod
    def create(cls, dataset: Dataset, seed: int = 0, **options: Any) -> Self:
        return cls(dataset.n_items, _build_config(MFConfig, "mf", options), seed=seed)

    # -- the one least-squares step, used for users (training and fold-in) and items ---------------

    @staticmethod
    def _solve(fixed: torch.Tensor, lists: Sequence[np.ndarray], conf: Sequence[np.ndarray],
               reg: float, chunk: int = 2048, gram: torch.Tensor | None = None) -> torch.Tensor:
        """For each row r: argmin_x sum_i c_ri (p_ri - x.f_i)^2 + reg |x|^2 over all i (p = 1 on `lists[r]`).

        fixed: (M, f) factors of the other side; lists[r] indices into it, conf[r] their confidences c > 1
        (all other entries have confidence 1 and preference 0). Returns (len(lists), f).
        """
        f = fixed.shape[1]
        if gram is None:
            gram = fixed.T @ fixed + reg * torch.eye(f)
        out = torch.zeros(len(lists), f)
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), chunk):
            rows = order[start : start + chunk]
            L = int(lengths[rows].max()) if len(rows) else 0
            if L == 0:
                continue  # empty lists: x = 0
            idx = np.zeros((len(rows), L), dtype=np.int64)
            c = np.zeros((len(rows), L), dtype=np.float32)
            for k, r in enumerate(rows):
                idx[k, : lengths[r]] = lists[r]
                c[k, : lengths[r]] = conf[r]
            F = fixed[torch.from_numpy(idx)]  # (R, L, f)
            C = torch.from_numpy(c)  # (R, L), padding has c = 0 -> contributes nothing
            A = gram + torch.einsum("rl,rlf,rlg->rfg", C - (C > 0).float(), F, F)
            b = torch.einsum("rl,rlf->rf", C, F)
            out[torch.from_numpy(rows)] = torch.linalg.solve(A, b)
        return out

    def _confidence(self, history: np.ndarray) -> np.ndarray:
        """Per unique history item: 1 + alpha * (recency-weighted count)."""
        w = _recency_weights(len(history), self.config.recent_half_life)
        items, inverse = np.unique(history, return_inverse=True)
        r = np.bincount(inverse, weights=w)
        return items, (1.0 + self.config.alpha * r).astype(np.float32)

    def fold_in(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, f) user vectors solved from the histories against the item factors."""
        lists, conf = [], []
        for h in histories:
            h = np.asarray(h, dtype=np.int64)[-self.config.max_history:]
            h = h[(h > 0) & (h <= self.n_items)]
            items, c = self._confidence(h)
            lists.append(items)
            conf.append(c)
        if self._gram is None:
            self._gram = self.item_factors.T @ self.item_factors + self.config.reg * torch.eye(self.config.factors)
        return self._solve(self.item_factors, lists, conf, self.config.reg, gram=self._gram)

    def fit(self, dataset: Dataset, split: LeaveOneOut, log: TrainLog | None = None) -> None:
        from rerank.infra.progress import progress_bar
        from rerank.models.evaluate import evaluate

        cfg = self.config
        start = time.monotonic()
        user_items, user_conf = [], []
        for s in split.train:
            items, c = self._confidence(np.asarray(s[-cfg.max_history:], dtype=np.int64))
            user_items.append(items)
            user_conf.append(c)
        # the transposed lists: for each item, the users holding it and their confidences
        u_of = np.repeat(np.arange(len(user_items)), [len(x) for x in user_items])
        i_of = np.concatenate(user_items) if user_items else np.zeros(0, dtype=np.int64)
        c_of = np.concatenate(user_conf) if user_conf else np.zeros(0, dtype=np.float32)
        order = np.argsort(i_of, kind="stable")
        bounds = np.searchsorted(i_of[order], np.arange(self.n_items + 2))
        item_users = [u_of[order[bounds[i]: bounds[i + 1]]] for i in range(self.n_items + 1)]
        item_conf = [c_of[order[bounds[i]: bounds[i + 1]]] for i in range(self.n_items + 1)]
        item_users[0], item_conf[0] = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)

        eval_users = None
        if cfg.eval_users and cfg.eval_users < len(split.users):
            eval_users = np.sort(np.random.default_rng(self.seed).choice(split.users, cfg.eval_users, replace=False))
        best, best_factors, bad = -1.0, self.item_factors.clone(), 0
        for epoch in progress_bar(range(1, cfg.epochs + 1), desc="mf als", unit="epoch", leave=False):
            users = self._solve(self.item_factors, user_items, user_conf, cfg.reg)
            self.item_factors = self._solve(users, item_users, item_conf, cfg.reg)
            self.item_factors[0] = 0.0
            self._gram = None
            valid = evaluate(self, dataset, split, which="valid", users=eval_users, ks=(10,))
            if log is not None:
                log.log(epoch=epoch, valid_ndcg10=valid["ndcg@10"], valid_hr10=valid["hr@10"],
                        seconds=round(time.monotonic() - start, 2))
            if valid["ndcg@10"] > best:
                best, best_factors, bad = valid["ndcg@10"], self.item_factors.clone(), 0
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
            if cfg.max_minutes and time.monotonic() - start > 60 * cfg.max_minutes:
                break
        self.item_factors = best_factors
        self._gram = None

    def score(self, histories: Sequence[np.ndarray], candidates: np.ndarray | None = None,
              event_types: Sequence[np.ndarray] | None = None) -> np.ndarray:
        users = self.fold_in(histories)
        full = (users @ self.item_factors.T).numpy()
        full[:, 0] = -np.inf
        return take_candidates(full, candidates)

    def save_weights(self, path: Path) -> dict:
        _save_npz(path, item_factors=self.item_factors.numpy())
        return asdict(self.config)

    @classmethod
    def load_weights(cls, path: Path, config: dict) -> Self:
        factors = _load_npz(path, "item_factors")["item_factors"]
        cfg = _build_config(MFConfig, "mf", _own(config, MFConfig))
        if factors.ndim != 2 or factors.shape[1] != cfg.factors:
            raise ValueError(f"{path / WEIGHTS_FILE}: item_factors shape {factors.shape} does not match factors={cfg.factors}")
        return cls(factors.shape[0] - 1, cfg, factors)

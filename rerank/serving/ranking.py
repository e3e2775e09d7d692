"""List-level re-ranking after the model has scored the candidates (numpy only).

`rank` turns one request's scored candidates into the answer, in this order:

1. cold start: candidates the model cannot score (item_idx 0 = unknown to the store, idx
   above the model's `known_items`, or a non-finite score) get a score placed among the
   known candidates' scores by popularity: the quantile `cold_start_weight * popularity
   percentile` of the known scores. So with
   weight 0.5, the most popular unknown item lands at the median, one without any events
   at the bottom; with no known candidate at all, the popularity prior itself is the score;
2. additive boosts by item id;
3. exclusions: the user's purchased items (when `exclude_purchased`) and explicit ids;
4. top-k: pure score order when `diversity` is 0, else greedy MMR (or, with
   `diversity_method="dpp"`, a greedy DPP) over the candidates' attributes (cosine
   similarity of their multi-hot attribute vectors).

Ties keep the candidates' input order, so the result is deterministic.

Whatever the inputs (NaN/inf model scores, popularity or boosts, boosts near 1e308), the
returned scores are finite floats within +-SCORE_LIMIT (so they always render as JSON) and
no item is returned twice: model scores and boosts are clamped before any arithmetic, and
the greedy diversifiers only ever pick items not picked yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

DIVERSITY_METHODS = ("mmr", "dpp")
# weights of the (views, clicks, carts, purchases) counters in the popularity prior
EVENT_WEIGHTS = np.array([1.0, 2.0, 4.0, 8.0])
# Every score is clamped into [-SCORE_LIMIT, SCORE_LIMIT]: far beyond any model score (O(1..10))
# or boost the API allows (1e3), and small enough that differences of scores never overflow.
SCORE_LIMIT = 1e12


def _finite(values: np.ndarray, nan: float = 0.0) -> np.ndarray:
    """float64 copy of `values` with NaN -> `nan` and everything clamped to +-SCORE_LIMIT."""
    out = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=nan, posinf=SCORE_LIMIT, neginf=-SCORE_LIMIT)
    return np.clip(out, -SCORE_LIMIT, SCORE_LIMIT, out=out)


@dataclass
class RankingRules:
    """Per-request list rules (the HTTP body's `k` and `rules`)."""

    k: int = 20
    diversity: float = 0.0  # trade-off: 0 = pure score order, 1 = only novelty of attributes
    diversity_method: str = "mmr"  # "mmr" (greedy max marginal relevance) or "dpp" (greedy DPP MAP)
    exclude_purchased: bool = True
    exclude_items: list[str] = field(default_factory=list)
    boost: dict[str, float] = field(default_factory=dict)  # item_id -> added to its score
    cold_start_weight: float = 0.5  # how high unknown items may rise by popularity (quantile of known scores)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"RankingRules.k: expected >= 1, got {self.k}")
        if not 0.0 <= self.diversity <= 1.0:
            raise ValueError(f"RankingRules.diversity: expected 0..1, got {self.diversity}")
        if self.diversity_method not in DIVERSITY_METHODS:
            raise ValueError(
                f"RankingRules.diversity_method: expected one of {'|'.join(DIVERSITY_METHODS)}, "
                f"got {self.diversity_method!r}"
            )
        if not 0.0 <= self.cold_start_weight <= 1.0:
            raise ValueError(f"RankingRules.cold_start_weight: expected 0..1, got {self.cold_start_weight}")


def popularity_prior(stats: np.ndarray | None, n: int) -> np.ndarray:
    """(n,) log(1 + weighted views/clicks/carts/purchases) from (n, 4) counters; zeros without them."""
    if stats is None or len(stats) == 0:
        return np.zeros(n)
    stats = np.asarray(stats, dtype=np.float64)
    return np.log1p(stats[:, : len(EVENT_WEIGHTS)] @ EVENT_WEIGHTS[: stats.shape[1]])


def attribute_features(attributes: np.ndarray) -> np.ndarray:
    """(C, A) attribute ids (0 = padding) -> (C, F) float32 multi-hot over the ids present."""
    attributes = np.asarray(attributes)
    if attributes.ndim != 2:
        raise ValueError(f"attributes: expected a (C, A) array of attribute ids, got shape {attributes.shape}")
    present, column = np.unique(attributes, return_inverse=True)
    column = column.reshape(attributes.shape)
    out = np.zeros((attributes.shape[0], len(present)), dtype=np.float32)
    rows = np.broadcast_to(np.arange(attributes.shape[0])[:, None], attributes.shape)
    out[rows, column] = 1.0
    if len(present) and present[0] == 0:
        out = out[:, 1:]  # the padding id is not an attribute
    return out


def _relevance(scores: np.ndarray) -> np.ndarray:
    """Scores min-max scaled to [0, 1] (zeros when all are equal)."""
    span = scores.max() - scores.min()
    return (scores - scores.min()) / span if span > 0 else np.zeros(len(scores))


class _Similarity:
    """Cosine similarity of one row of `features` to all rows, from its few nonzero features.

    A feature set in only one row adds nothing to the similarity of two different rows, so
    those columns are dropped; the rest is kept as (F, C) rows scaled by 1/norm.
    """

    def __init__(self, features: np.ndarray) -> None:
        feats = np.asarray(features, dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", feats, feats))
        inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        self.columns = feats[:, np.count_nonzero(feats, axis=0) > 1].T * inverse
        self.n = feats.shape[0]

    def to(self, item: int) -> np.ndarray:
        """(C,) cosine similarity of every row to row `item` (its own entry is not meaningful)."""
        nonzero = np.flatnonzero(self.columns[:, item])
        if nonzero.size == 0:
            return np.zeros(self.n)
        return (self.columns[nonzero].T @ self.columns[nonzero, item]).astype(np.float64)


def _greedy_start(scores: np.ndarray, lam: float, k: int) -> tuple[np.ndarray, int, np.ndarray | None]:
    """Common start of the greedy diversifiers: float scores, k capped at n, and the answer
    when there is nothing to diversify (k <= 0: empty; lam == 0: plain score order).
    Non-finite scores are made finite first (NaN = the bottom), so no step sees NaN or inf."""
    scores = _finite(scores, nan=-SCORE_LIMIT)
    k = min(k, len(scores))
    if k <= 0:
        return scores, k, np.zeros(0, dtype=np.int64)
    if lam == 0.0:
        return scores, k, np.argsort(-scores, kind="stable")[:k]
    return scores, k, None


def mmr(scores: np.ndarray, features: np.ndarray, lam: float, k: int) -> np.ndarray:
    """Greedy maximal marginal relevance: up to k indices into `scores`, in pick order.

    Each step picks argmax (1 - lam) * relevance - lam * max cosine similarity to the picked
    items, with relevance = scores min-max scaled to [0, 1] (so lam does not depend on the
    score scale). lam = 0 is score order. Ties go to the lower index.
    """
    scores, k, trivial = _greedy_start(scores, lam, k)
    if trivial is not None:
        return trivial
    n = len(scores)
    similarity = _Similarity(features)
    gain = (1.0 - lam) * _relevance(scores)
    penalty = np.zeros(n)  # lam * max similarity to the picked items
    is_picked = np.zeros(n, dtype=bool)
    picked = np.empty(k, dtype=np.int64)
    for step in range(k):
        value = gain - penalty
        value[is_picked] = -np.inf
        best = int(np.argmax(value))
        if is_picked[best]:  # defensive (all values -inf/NaN): never return an item twice
            best = int(np.flatnonzero(~is_picked)[0])
        picked[step] = best
        is_picked[best] = True
        np.maximum(penalty, lam * np.nan_to_num(similarity.to(best)), out=penalty)
    return picked


def dpp(scores: np.ndarray, features: np.ndarray, lam: float, k: int) -> np.ndarray:
    """Greedy MAP of a determinantal point process: up to k indices into `scores`, in pick order.

    Kernel L = diag(q) S diag(q) with S the cosine similarity of `features` (diagonal 1) and
    quality q = exp(alpha * (relevance - 1)), alpha = (1 - lam) / (2 lam) (Chen et al., NeurIPS
    2018, fast greedy MAP with incremental Cholesky). lam -> 0 is score order, lam = 1 ignores
    the scores. When no pick adds volume any more (duplicates), the rest follow score order.
    """
    scores, k, trivial = _greedy_start(scores, lam, k)
    if trivial is not None:
        return trivial
    n = len(scores)
    similarity = _Similarity(features)
    alpha = min((1.0 - lam) / (2.0 * lam), 200.0)
    quality = np.exp(alpha * (_relevance(scores) - 1.0))
    gain = quality**2  # d_i^2: the squared volume item i would add
    cholesky = np.zeros((k, n))
    available = np.ones(n, dtype=bool)
    picked: list[int] = []
    best = int(np.argmax(gain))
    for step in range(k):
        picked.append(best)
        available[best] = False
        if step == k - 1:
            break
        row = quality[best] * quality * np.nan_to_num(similarity.to(best))  # L[best, :]
        row[best] = quality[best] ** 2
        e = (row - cholesky[:step, best] @ cholesky[:step]) / np.sqrt(gain[best])
        cholesky[step] = e
        gain = gain - e**2
        remaining = np.where(available & ~np.isnan(gain), gain, -np.inf)  # taken or NaN: no volume
        best = int(np.argmax(remaining))
        if remaining[best] <= 1e-12 * quality.max() ** 2:
            rest = [i for i in np.argsort(-scores, kind="stable") if available[i]]
            picked.extend(rest[: k - len(picked)])
            break
    return np.asarray(picked, dtype=np.int64)


def cold_start_scores(scores: np.ndarray, cold: np.ndarray, popularity: np.ndarray, weight: float) -> np.ndarray:
    """Scores with the `cold` entries replaced by a popularity-driven quantile of the others."""
    out = np.asarray(scores, dtype=np.float64).copy()
    if not cold.any():
        return out
    popularity = np.asarray(popularity, dtype=np.float64)
    known = out[~cold]
    if known.size == 0:
        out[cold] = popularity[cold]
        return out
    # percentile of each candidate's popularity: the share of candidates strictly below it
    order = np.sort(popularity)
    below = np.searchsorted(order, popularity[cold], side="left")
    pct = below / max(len(popularity) - 1, 1)
    out[cold] = np.quantile(known, np.clip(weight * pct, 0.0, 1.0))
    return out


def rank(
    candidate_ids: Sequence[str],
    candidate_idx: np.ndarray,
    scores: np.ndarray,
    *,
    rules: RankingRules,
    purchased_idx: np.ndarray | None = None,
    attributes: np.ndarray | None = None,
    popularity: np.ndarray | None = None,
    known_items: int | None = None,
) -> list[tuple[str, float]]:
    """The top `rules.k` (item_id, score) of one request's candidates (see the module docstring).

    candidate_idx: (C,) item_idx, 0 = unknown; scores: (C,) model scores; purchased_idx: the
    user's bought item_idx; attributes: (C, A) attribute ids, 0-padded; popularity: (C,) prior;
    known_items: the model's n_items, when given items above it (new since training) are cold too.
    """
    n = len(candidate_ids)
    candidate_idx = np.asarray(candidate_idx, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    for name, array in (("candidate_idx", candidate_idx), ("scores", scores)):
        if len(array) != n:
            raise ValueError(f"rank: {name} has {len(array)} entries for {n} candidate ids")
    if popularity is None:
        popularity = np.zeros(n)
    popularity = np.asarray(popularity, dtype=np.float64).reshape(-1)
    if len(popularity) != n:
        raise ValueError(f"rank: popularity has {len(popularity)} entries for {n} candidate ids")
    if attributes is not None and len(attributes) != n:
        raise ValueError(f"rank: attributes has {len(attributes)} rows for {n} candidate ids")
    if n == 0:
        return []

    cold = (candidate_idx == 0) | ~np.isfinite(scores)
    if known_items is not None:
        cold |= candidate_idx > known_items
    popularity = _finite(popularity)
    final = cold_start_scores(_finite(scores), cold, popularity, rules.cold_start_weight)
    if rules.boost:  # a NaN boost counts as none; +-inf and huge ones are clamped with the sum
        boost = np.fromiter((rules.boost.get(i, 0.0) for i in candidate_ids), dtype=np.float64, count=n)
        final = final + _finite(boost)
    final = _finite(final, nan=-SCORE_LIMIT)

    keep = np.ones(n, dtype=bool)
    if rules.exclude_purchased and purchased_idx is not None and len(purchased_idx):
        keep &= ~(np.isin(candidate_idx, np.asarray(purchased_idx)) & (candidate_idx > 0))
    if rules.exclude_items:
        excluded = set(rules.exclude_items)
        keep &= np.fromiter((i not in excluded for i in candidate_ids), dtype=bool, count=n)
    pool = np.flatnonzero(keep)
    if pool.size == 0:
        return []

    if rules.diversity > 0.0 and attributes is not None:
        features = attribute_features(np.asarray(attributes)[pool])
        select = mmr if rules.diversity_method == "mmr" else dpp
        order = pool[select(final[pool], features, rules.diversity, rules.k)]
    else:
        order = pool[np.argsort(-final[pool], kind="stable")[: rules.k]]
    return [(candidate_ids[i], float(final[i])) for i in order]

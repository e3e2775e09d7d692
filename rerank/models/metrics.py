"""Ranking metrics for one target per user: HR@k, NDCG@k (binary relevance) and MRR.

Everything starts from the 0-based rank of the target among the scored items.
Ties are counted pessimistically: every other item whose score equals the target's
is ranked ahead of it, so a model that scores everything alike gains nothing from
ties (the reference code's argsort/argpartition breaks them arbitrarily instead; with
float scores from a trained model ties are rare, so the two agree in practice).
A target whose score is -inf (masked, e.g. it was already in the user's history) is
a miss at every k: its rank is MISS_RANK.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

MISS_RANK = 2**62  # rank of a target that cannot be ranked (masked): a miss at any k, MRR ~ 0


def target_ranks(scores: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> np.ndarray:
    """0-based rank of each row's target column: the number of other items scored >= it.

    scores (B, N) float, already masked with -inf where items must not be ranked;
    targets (B,) int column indices. Returns (B,) int64; -inf targets get MISS_RANK.
    """
    s = torch.as_tensor(scores)
    t = torch.as_tensor(targets, dtype=torch.int64)
    if s.ndim != 2 or t.shape != (s.shape[0],):
        raise ValueError(f"scores must be (B, N) and targets (B,), got {tuple(s.shape)} and {tuple(t.shape)}")
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= s.shape[1]):
        raise ValueError(f"targets must be column indices in 0..{s.shape[1] - 1}")
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    target_score = s.gather(1, t[:, None])  # (B, 1)
    ahead = (s >= target_score).sum(dim=1) - 1  # the target itself compares equal
    ranks = torch.where(torch.isneginf(target_score[:, 0]), MISS_RANK, ahead)
    return ranks.numpy().astype(np.int64)


def metrics_from_ranks(ranks: np.ndarray, ks: Iterable[int] = (5, 10, 20)) -> dict[str, float]:
    """Mean HR@k, NDCG@k for each k, and MRR over 0-based ranks; plus "users" (the count)."""
    r = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    n = len(r)
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = float(hit.mean()) if n else 0.0
    for k in ks:
        hit = r < k
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean()) if n else 0.0
    out["mrr"] = float((1.0 / (r + 1.0)).mean()) if n else 0.0
    out["users"] = n
    return out

"""Batch scoring for serving: many requests' candidate lists in ONE model call.

Requests in a batch have different candidate counts; they are right-padded with
item_idx 0 into one (B, C_max) matrix, scored by `Recommender.score` in one
forward pass, and cut back to each request's length. Items the model does not
know yet (idx 0, or idx beyond the model's n_items: items first seen online,
before the trainer grew the model) get a NaN score: the model knows nothing about
them, and rerank.serving.ranking places non-finite scores by its popularity prior (cold start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rerank.models.recommender import Recommender


@dataclass
class ScoreInput:
    """What the scorer needs of one request (all item_idx; types are EVENT_CODE)."""

    history: np.ndarray  # int32, oldest -> newest
    history_types: np.ndarray  # int8, aligned with history
    candidates: np.ndarray  # int32 (C,), 0 = unknown item


def score_batch(model: Recommender, inputs: Sequence[ScoreInput], history_len: int = 50) -> list[np.ndarray]:
    """Scores (float32, one array per input, same length as its candidates) from one model call."""
    if not inputs:
        return []
    n_items = int(model.n_items)
    histories, types = [], []
    for x in inputs:
        hist = np.asarray(x.history, dtype=np.int64)[-history_len:]
        kinds = np.asarray(x.history_types, dtype=np.int64)[-history_len:]
        keep = (hist > 0) & (hist <= n_items)  # drop items the model cannot embed yet
        histories.append(hist[keep])
        types.append(kinds[keep] if len(kinds) == len(keep) else kinds)
    width = max(len(x.candidates) for x in inputs)
    matrix = np.zeros((len(inputs), max(width, 1)), dtype=np.int64)
    for row, x in enumerate(inputs):
        cands = np.asarray(x.candidates, dtype=np.int64)
        matrix[row, : len(cands)] = np.where((cands > 0) & (cands <= n_items), cands, 0)
    scores = np.array(model.score(histories, matrix, types), dtype=np.float32)
    scores[matrix == 0] = np.nan  # unknown to the model: cold start is the ranker's job
    return [scores[row, : len(x.candidates)] for row, x in enumerate(inputs)]

"""`PublishGuard`: candidate weights are checked on a rolling holdout before they are published.

1 in `holdout_every` events is held out, never trained on, and kept in a rolling window (the
choice: rerank.online.examples.is_holdout, made server-side by rerank.online.loop). Before
publishing, the candidate weights must be finite and their holdout cross-entropy must not exceed
the serving version's by more than `guard_margin` (relative). Otherwise the candidate is refused
(counted), the serving version stays, and the trainer goes back to its weights.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rerank.online.config import OnlineConfig
from rerank.online.examples import Example, batch_tensors, last_position_loss

if TYPE_CHECKING:
    from rerank.models.sequential import SequentialRecommender


@dataclass
class GuardResult:
    ok: bool
    reason: str
    candidate_loss: float | None = None
    serving_loss: float | None = None
    holdout: int = 0
    anchor_loss: float | None = None  # the offline baseline's (PublishGuard.anchor), when there is one


class PublishGuard:
    """Checks candidate weights against the serving ones on a rolling holdout of recent events.

    The comparison runs on a snapshot of the newest `guard_eval_size` held-out examples, renewed
    once a quarter of it is stale; while the snapshot stands, the serving weights' loss on it is
    cached (after a publish the accepted candidate's loss is the new serving loss), so a check
    usually costs one forward pass over the snapshot, not two.

    `anchor` (the registry's newest offline version, set by the loop when `guard_anchor`): the
    candidate must also stay within the margin of it. Compared with the serving version alone,
    candidates each up to `guard_margin` worse than the last could ratchet down step by step.
    """

    def __init__(self, config: OnlineConfig):
        self.config = config
        self.holdout: deque[Example] = deque(maxlen=config.holdout_size)
        self.refusals = 0
        self._added = 0  # examples added since the snapshot was taken
        self._snapshot: list[Example] = []
        self._cache: tuple[int, int, float] | None = None  # (id(serving model), n_items, loss)
        self._last: tuple[int, float] | None = None  # (n_items, loss) of the last accepted candidate
        self.anchor: "SequentialRecommender | None" = None
        self._anchor_cache: tuple[int, float] | None = None  # (n_items, loss) on the current snapshot

    def add(self, example: Example) -> None:
        self.holdout.append(example)
        self._added += 1

    def _rows(self, n_items: int) -> list[Example]:
        stale = self._added >= max(self.config.guard_min_holdout, len(self._snapshot) // 4)
        if not self._snapshot or stale:
            self._snapshot = list(self.holdout)[-self.config.guard_eval_size:]
            self._added = 0
            self._cache = None
            self._anchor_cache = None
        return [e for e in self._snapshot if 0 < e.target <= n_items]

    @torch.no_grad()
    def holdout_loss(self, model: "SequentialRecommender", n_items: int,
                     rows: list[Example] | None = None) -> tuple[float, int]:
        """Mean last-position CE over held-out examples whose items both models know."""
        if rows is None:
            rows = [e for e in list(self.holdout)[-self.config.guard_eval_size:] if 0 < e.target <= n_items]
        if not rows:
            return math.nan, 0
        module = model.module
        module.eval()
        seq, types, targets = batch_tensors(rows, module.config.max_len, n_items, model.device)
        return float(last_position_loss(module, seq, types, targets)), len(rows)

    def finite(self, model: "SequentialRecommender") -> bool:
        limit = self.config.max_param_abs
        with torch.no_grad():
            return all(bool(torch.isfinite(p).all()) and float(p.abs().max()) <= limit
                       for p in model.module.parameters() if p.numel())

    def accepted(self, serving: "SequentialRecommender") -> None:
        """The last checked candidate is now `serving`: reuse its holdout loss."""
        if self._last is not None:
            self._cache = (id(serving), *self._last)
        self._last = None

    def check(self, candidate: "SequentialRecommender", serving: "SequentialRecommender | None") -> GuardResult:
        """ok=False (and refusals += 1) for non-finite weights or a holdout loss beyond the margin."""
        self._last = None
        if not self.finite(candidate):
            self.refusals += 1
            return GuardResult(False, "non-finite or exploding weights")
        if serving is None:
            return GuardResult(True, "no serving version to compare with")
        n = min(candidate.n_items, serving.n_items)
        rows = self._rows(n)
        if len(rows) < self.config.guard_min_holdout:
            return GuardResult(True, f"holdout too small ({len(rows)})", holdout=len(rows))
        cand, count = self.holdout_loss(candidate, n, rows)
        if self._cache is not None and self._cache[:2] == (id(serving), n):
            serve = self._cache[2]
        else:
            serve, _ = self.holdout_loss(serving, n, rows)
            self._cache = (id(serving), n, serve)
        if not math.isfinite(cand):
            self.refusals += 1
            return GuardResult(False, "non-finite holdout loss", cand, serve, count)
        if cand > serve * (1.0 + self.config.guard_margin) + 1e-9:
            self.refusals += 1
            return GuardResult(False, f"holdout loss {cand:.4f} > serving {serve:.4f} * (1 + {self.config.guard_margin})",
                               cand, serve, count)
        anchor = self._anchor_check(candidate, cand, n, rows)
        if anchor is not None and anchor[0] > anchor[1] * (1.0 + self.config.guard_margin) + 1e-9:
            self.refusals += 1
            return GuardResult(False, f"holdout loss {anchor[0]:.4f} > offline baseline {anchor[1]:.4f} * "
                                      f"(1 + {self.config.guard_margin})", cand, serve, count, anchor[1])
        self._last = (n, cand)
        return GuardResult(True, "ok", cand, serve, count, None if anchor is None else anchor[1])

    def _anchor_check(self, candidate: "SequentialRecommender", cand: float, n: int,
                      rows: list[Example]) -> tuple[float, float] | None:
        """(candidate loss, anchor loss) on the held-out rows whose items the anchor knows too
        (new items since the offline version are left out of this comparison only); None without
        an anchor or with too few such rows."""
        if self.anchor is None:
            return None
        n_anchor = min(n, self.anchor.n_items)
        if n_anchor < n:
            rows = [e for e in rows if e.target <= n_anchor]
            if len(rows) < self.config.guard_min_holdout:
                return None
            cand = self.holdout_loss(candidate, n_anchor, rows)[0]
        if self._anchor_cache is None or self._anchor_cache[0] != n_anchor:
            self._anchor_cache = (n_anchor, self.holdout_loss(self.anchor, n_anchor, rows)[0])
        return cand, self._anchor_cache[1]

"""`IncrementalTrainer` (model level, no Redis): gradient steps on next-item examples, growing items.

Next-item examples (pre-event sequence -> item, rerank.online.examples) -> gradient steps in
small batches with the offline loss (full-softmax cross-entropy, here at the last position: the
only new transition an event brings); items beyond the catalogue get embedding rows on the fly
(reserved `item_capacity` rows, or a grown table: `ensure_capacity`), initialised from the mean
item embedding (their attribute embeddings add on top when attributes are known). A grown table
doubles, but never beyond `max_items` + 1 rows (`max_items` > 0: the feature store's item
capacity, the highest item_idx it assigns; the loop skips entries naming an item_idx above it,
as target or in their seq, counted in `events_invalid` and `events_over_max_items`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from rerank.online.config import TRAINABLE, OnlineConfig
from rerank.online.examples import Example, batch_tensors, last_position_loss

if TYPE_CHECKING:
    from rerank.models.sequential import SequentialRecommender


def ensure_capacity(model: "SequentialRecommender", n_items: int, max_items: int = 0) -> bool:
    """Make room for item_idx up to n_items: reserved rows first, else a bigger table. True if rebuilt.

    A bigger table doubles the rows (amortised growth), but never beyond `max_items` + 1 rows when
    `max_items` > 0 (ValueError if n_items itself is beyond it)."""
    from rerank.models.sasrec import SASRec, SASRecConfig

    module = model.module
    if n_items + 1 <= module.config.item_capacity:
        return False
    if max_items > 0 and n_items > max_items:
        raise ValueError(f"item_idx {n_items} is beyond max_items {max_items}")
    old_cap = module.config.item_capacity
    capacity = max(n_items + 1, old_cap * 2)
    if max_items > 0:
        capacity = min(capacity, max_items + 1)
    cfg = SASRecConfig.from_dict({**module.config.to_dict(), "item_capacity": capacity})
    new = SASRec(cfg).to(model.device)
    state = module.state_dict()
    new_state = new.state_dict()
    for key, value in state.items():
        if new_state[key].shape == value.shape:
            new_state[key] = value
        else:  # item-indexed rows (embedding, attributes buffer, bias): copy the old rows
            new_state[key][: value.shape[0]] = value
    new.load_state_dict(new_state)
    new.train(module.training)
    model.module, model.config = new, new.config
    return True


class IncrementalTrainer:
    """Gradient steps on next-item examples for a SequentialRecommender, growing items as they come.

    `items_added` counts distinct item_idx this trainer gave rows to beyond the largest catalogue
    it stood on (a high-water mark: items grown again after a `reset` to weights without them, e.g.
    after a guard refusal, are not counted again). With `config.max_items` > 0 the table never
    grows beyond max_items + 1 rows and `step` drops examples whose target is beyond it.
    """

    def __init__(self, model: "SequentialRecommender", config: OnlineConfig | None = None):
        self.model = model
        self.config = config or OnlineConfig()
        self._make_optimizer()
        self.steps = 0
        self.items_added = 0
        self._items_high = model.n_items  # the most items any weights of this trainer had

    def _make_optimizer(self) -> None:
        names = TRAINABLE[self.config.trainable]
        params = []
        for name, param in self.model.module.named_parameters():
            param.requires_grad_(names is None or name in names)
            if param.requires_grad:
                params.append(param)
        self._opt_steps = 0  # steps of this optimizer (the warmup restarts with it)
        self.opt = torch.optim.AdamW(params, lr=self.config.lr,
                                     weight_decay=self.config.weight_decay, betas=(0.9, 0.98))

    def reset(self, model: "SequentialRecommender") -> None:
        """Stand on other weights (after a refusal or a rollback); fresh optimizer state."""
        self.model = model
        self._items_high = max(self._items_high, model.n_items)
        self._make_optimizer()

    def grow(self, max_idx: int, attributes: np.ndarray | None = None) -> int:
        """Start scoring items up to max_idx; new rows start at the mean item embedding. Returns #rows added
        to these weights (`items_added` grows only by the items no earlier weights had). ValueError
        beyond `config.max_items`."""
        model = self.model
        old = model.n_items
        if max_idx <= old:
            return 0
        if ensure_capacity(model, max_idx, self.config.max_items):
            self._make_optimizer()
        module = model.module
        with torch.no_grad():
            mean = module.item_emb.weight[1 : old + 1].mean(0)
            module.item_emb.weight[old + 1 : max_idx + 1] = mean
        module.grow_items(max_idx, None if attributes is None else torch.as_tensor(attributes))
        self.items_added += max(0, max_idx - max(old, self._items_high))
        self._items_high = max(self._items_high, max_idx)
        return max_idx - old

    def step(self, examples: list[Example]) -> float:
        """One optimizer step per `batch_size` examples; returns the mean loss (nan when none).

        Examples whose target is beyond `config.max_items` (> 0) are dropped (the loop skips and
        counts their entries before they get here)."""
        if self.config.max_items > 0:
            examples = [e for e in examples if e.target <= self.config.max_items]
        if not examples:
            return math.nan
        self.grow(max(e.target for e in examples))
        module = self.model.module
        module.train()
        total = 0.0
        bs = self.config.batch_size
        for lo in range(0, len(examples), bs):
            chunk = examples[lo : lo + bs]
            seq, types, targets = batch_tensors(chunk, module.config.max_len, module.n_items, self.model.device)
            loss = last_position_loss(module, seq, types, targets)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self._opt_steps += 1
            if self.config.warmup_steps > 0:
                for group in self.opt.param_groups:
                    group["lr"] = self.config.lr * min(1.0, self._opt_steps / self.config.warmup_steps)
            self.opt.step()
            with torch.no_grad():
                module.item_emb.weight[0].zero_()
            total += float(loss.detach()) * len(chunk)
            self.steps += 1
        module.eval()
        return total / len(examples)

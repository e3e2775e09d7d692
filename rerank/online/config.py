"""How the online trainer learns and publishes: `OnlineConfig`, one field per knob.

Every field can be set from the app's `online` block (deployments/app.py) or an experiment arm's
`online` block; `online_config` builds one from such a dict and names unknown keys. `trainable`
picks the parameters the steps update (`TRAINABLE`: "all", or "items" = the item embedding rows
and item bias).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from rerank.data.dataset import EVENT_TYPES

TRAINABLE = {"all": None, "items": ("item_emb.weight", "item_bias")}  # OnlineConfig.trainable -> parameter names


@dataclass
class OnlineConfig:
    lr: float = 5e-4
    batch_size: int = 64  # examples per gradient step
    weight_decay: float = 0.0
    publish_every_s: float = 0.5
    publish_every_events: int = 2000
    holdout_every: int = 10  # 1 in holdout_every events is held out (0 = no holdout, no guard metric)
    holdout_size: int = 500  # rolling window of held-out examples
    guard_eval_size: int = 200  # the guard scores the newest this many held-out examples (cost per publish)
    guard_margin: float = 0.05  # refuse if holdout CE > serving CE * (1 + margin)
    guard_min_holdout: int = 10  # fewer held-out examples: only the finiteness check
    guard_anchor: bool = True  # candidates must also be within guard_margin of the newest offline version
    read_count: int = 512
    max_param_abs: float = 1e4  # weights beyond this are treated like NaN by the guard
    only_arm: str = ""  # "experiment/arm": train on that experiment arm's events only (an arm's own trainer)
    max_items: int = 0  # highest item_idx the trainer gives a row (the store's item capacity); 0 = no cap
    max_uncommitted: int = 50_000  # consumed-but-uncheckpointed entries before the loop stops reading; 0 = no bound
    # event types whose item is a training target; the others are context only (they are in later
    # events' seq, never a label): e.g. without "view" when clients send a view for every list item
    # they show (exposure pings), which as labels reward what was shown rather than what was chosen
    target_types: tuple[str, ...] = EVENT_TYPES
    # what the steps update: "all" weights, or "items" (the item embedding rows and item bias; the
    # sequence encoder stays as trained offline)
    trainable: str = "all"
    warmup_steps: int = 50  # the learning rate ramps linearly from 0 over this many steps of a fresh optimizer
    #                         (Adam's first full-size steps cost CTR before they gain; see docs/SERVING.md)

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {list(TRAINABLE)}, got {self.trainable!r}")
        self.target_types = tuple(self.target_types)
        unknown = sorted(set(self.target_types) - set(EVENT_TYPES))
        if unknown or not self.target_types:
            raise ValueError(f"target_types must be a non-empty subset of {list(EVENT_TYPES)}, got "
                             f"{list(self.target_types)}")


def online_config(options: dict | None) -> OnlineConfig:
    """OnlineConfig from a dict, naming unknown keys."""
    options = dict(options or {})
    known = {f.name for f in fields(OnlineConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown online trainer option(s) {sorted(unknown)} (known: {sorted(known)})")
    return OnlineConfig(**options)

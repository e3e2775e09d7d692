"""The synthetic demo shop: a realistic event stream with a pattern only a sequential model can learn.

What is in it, and why:

* Items belong to categories and carry attributes ``category``, ``brand`` and ``price band``
  (dense attribute ids, so attribute-aware models have something to use).
* Popularity is long-tailed: item weights follow a Zipf law over a random item order.
* Each user has latent category interests (a sparse Dirichlet draw) that DRIFT: before
  each session, with some probability, part of the interest vector is replaced by a fresh draw.
* Users come back in sessions: exponential gaps of days between sessions, log-normal gaps
  of seconds to minutes between events inside one.
* Each interaction goes down a funnel view -> click -> cart -> purchase with decreasing
  probabilities; the event records the deepest stage reached (one event per interaction,
  so a user's sequence is a sequence of distinct items and leave-one-out targets never
  repeat an item of the prefix).
* The PLANTED SEQUENTIAL PATTERN: every item has a few fixed "next" items (two successors
  in its category, one complement in the next category), drawn uniformly, not by
  popularity. Inside a session the next viewed item is, with probability
  `follow_successor`, one of the current item's successors. Popularity cannot predict
  that; a model of "what follows what" can.

Deterministic for a given `SynthConfig` (seed included).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from rerank.data.dataset import EVENT_TYPES, write_dataset
from rerank.infra.progress import progress_bar

FUNNEL = EVENT_TYPES  # view, click, cart, purchase: the order of the funnel


@dataclass
class SynthConfig:
    """Knobs of the synthetic shop; the defaults make ~70k events that train in well under a minute."""

    n_users: int = 2000
    n_items: int = 1000
    seed: int = 0
    n_categories: int = 0  # 0 = max(4, n_items // 50)
    brands_per_category: int = 6
    n_price_bands: int = 5
    zipf_exponent: float = 1.1  # item popularity ~ 1 / rank^s
    interest_concentration: float = 0.25  # Dirichlet alpha: small = users like few categories
    drift_probability: float = 0.3  # chance, before each later session, that interests drift
    drift: float = 0.5  # share of the interest vector replaced by a fresh draw when it drifts
    mean_sessions: float = 5.0
    mean_session_views: float = 7.0
    successors_per_item: int = 3
    successor_weights: tuple[float, ...] = (0.5, 0.3, 0.2)
    successor_popularity_bias: float = 0.5  # successors drawn ~ weight^bias: 0 = uniform, 1 = by popularity
    follow_successor: float = 0.6  # P(next view in a session is a successor of the current item)
    click_rate: float = 0.35  # P(click | view)
    cart_rate: float = 0.3  # P(cart | click)
    purchase_rate: float = 0.4  # P(purchase | cart)
    start_ts: int = 1_704_067_200  # 2024-01-01T00:00:00Z
    arrival_days: float = 30.0  # users' first visits spread over this many days
    mean_session_gap_hours: float = 60.0
    median_event_gap_s: float = 35.0
    progress_min_users: int = 20_000  # show a tqdm bar from this many users

    @property
    def categories(self) -> int:
        return self.n_categories or max(4, self.n_items // 50)


@dataclass
class SynthShop:
    """The generated shop: dataset tables plus the ground truth that produced them."""

    config: SynthConfig
    users: pa.Table
    items: pa.Table
    events: pa.Table  # user_idx, item_idx, event_type, ts; per user in time order
    item_category: np.ndarray  # (n_items+1,) int32, category 0..C-1 (row 0 unused)
    item_weight: np.ndarray  # (n_items+1,) float64 Zipf popularity weight (row 0 = 0)
    successors: np.ndarray  # (n_items+1, successors_per_item) int32 item_idx
    session: np.ndarray  # (n_events,) int64 global session number of each event


def _ids(prefix: str, n: int) -> list[str]:
    width = len(str(n))
    return [f"{prefix}{i:0{width}d}" for i in range(1, n + 1)]  # text order == numeric order


def _make_catalogue(cfg: SynthConfig, rng: np.random.Generator):
    """Categories, brands, price bands, Zipf weights and successor lists of every item."""
    n, n_cat = cfg.n_items, cfg.categories
    category = np.zeros(n + 1, dtype=np.int32)
    category[1:] = rng.integers(0, n_cat, size=n)
    category[1 : n_cat + 1] = np.arange(n_cat)  # every category has at least one item
    brand_in_cat = np.minimum(rng.zipf(1.6, size=n + 1) - 1, cfg.brands_per_category - 1)
    price = rng.lognormal(mean=3.0 + rng.normal(0, 0.7, size=n_cat)[category], sigma=0.5)
    bands = np.quantile(price[1:], np.linspace(0, 1, cfg.n_price_bands + 1)[1:-1])
    price_band = np.digitize(price, bands)

    # attribute ids: categories 1..C, brands C+1..C+C*B, price bands after that
    brand_attr = n_cat + 1 + category * cfg.brands_per_category + brand_in_cat
    band_attr = n_cat + n_cat * cfg.brands_per_category + 1 + price_band
    attributes = [[int(category[i]) + 1, int(brand_attr[i]), int(band_attr[i])] for i in range(1, n + 1)]

    rank = rng.permutation(n) + 1
    weight = np.zeros(n + 1)
    weight[1:] = 1.0 / rank**cfg.zipf_exponent

    members = [np.flatnonzero(category == c) for c in range(n_cat)]
    members[0] = members[0][members[0] > 0]  # row 0 is padding, category 0 by default
    k = cfg.successors_per_item
    successors = np.zeros((n + 1, k), dtype=np.int32)
    for i in range(1, n + 1):
        same = members[category[i]]
        same = same[same != i]
        complement = members[(category[i] + 1) % n_cat]
        p_same = weight[same] ** cfg.successor_popularity_bias
        picks = list(rng.choice(same, size=min(k - 1, len(same)), replace=False, p=p_same / p_same.sum())) if len(same) else []
        p_comp = weight[complement] ** cfg.successor_popularity_bias
        while len(picks) < k:  # one complement (more when the category is tiny)
            picks.append(int(rng.choice(complement, p=p_comp / p_comp.sum())))
        successors[i] = picks[:k]
    return category, attributes, weight, successors, members


def generate_shop(cfg: SynthConfig = SynthConfig()) -> SynthShop:
    """Generate the synthetic shop for `cfg`; deterministic per `cfg.seed`."""
    if cfg.n_users < 1 or cfg.n_items < 10:
        raise ValueError(f"need n_users >= 1 and n_items >= 10, got {cfg.n_users} and {cfg.n_items}")
    if len(cfg.successor_weights) != cfg.successors_per_item:
        raise ValueError("successor_weights must have successors_per_item entries")
    rng = np.random.default_rng(cfg.seed)
    category, attributes, weight, successors, members = _make_catalogue(cfg, rng)
    n_cat = cfg.categories
    cat_cum = [np.cumsum(weight[m]) / weight[m].sum() for m in members]
    succ_cum = np.cumsum(cfg.successor_weights) / np.sum(cfg.successor_weights)
    all_items = np.arange(1, cfg.n_items + 1)
    funnel_rates = (cfg.click_rate, cfg.cart_rate, cfg.purchase_rate)
    event_gap_mu = np.log(cfg.median_event_gap_s)

    user_col: list[int] = []
    item_col: list[int] = []
    type_col: list[int] = []
    ts_col: list[int] = []
    session_col: list[int] = []
    session_no = 0
    bar = progress_bar(total=cfg.n_users, desc="synth users", unit="user", mininterval=1.0,
                       enabled=cfg.n_users >= cfg.progress_min_users)
    for user in range(1, cfg.n_users + 1):
        interests = rng.dirichlet(np.full(n_cat, cfg.interest_concentration))
        activity = rng.lognormal(-0.28, 0.75)  # mean ~1: some users come back far more often
        n_sessions = 1 + rng.poisson(activity * (cfg.mean_sessions - 1))
        t = cfg.start_ts + rng.uniform(0, cfg.arrival_days * 86400)
        interest_cum = np.cumsum(interests)
        seen: set[int] = set()

        def fresh() -> int:
            """An unseen item: category from the user's interests, item by popularity within it."""
            for _ in range(8):
                c = min(int(np.searchsorted(interest_cum, rng.random() * interest_cum[-1])), n_cat - 1)
                item = int(members[c][min(np.searchsorted(cat_cum[c], rng.random()), len(members[c]) - 1)])
                if item not in seen:
                    return item
            unseen = all_items[~np.isin(all_items, list(seen))]
            return int(rng.choice(unseen)) if len(unseen) else 0

        for s in range(n_sessions):
            if s > 0:
                t += rng.exponential(cfg.mean_session_gap_hours * 3600)
                if rng.random() < cfg.drift_probability:
                    new = rng.dirichlet(np.full(n_cat, cfg.interest_concentration))
                    interests = (1 - cfg.drift) * interests + cfg.drift * new
                    interest_cum = np.cumsum(interests)
            n_views = 1 + rng.poisson(cfg.mean_session_views - 1)
            if s == 0:
                n_views = max(n_views, 3)  # everyone can be evaluated leave-one-out
            current = 0
            for _ in range(n_views):
                item = 0
                if current and rng.random() < cfg.follow_successor:
                    first = int(np.searchsorted(succ_cum, rng.random()))
                    for j in range(cfg.successors_per_item):
                        candidate = int(successors[current, (first + j) % cfg.successors_per_item])
                        if candidate not in seen:
                            item = candidate
                            break
                if not item:
                    item = fresh()
                if not item:
                    break  # the user has seen the whole catalogue
                stage = 0
                while stage < 3 and rng.random() < funnel_rates[stage]:
                    stage += 1
                seen.add(item)
                user_col.append(user)
                item_col.append(item)
                type_col.append(stage)
                ts_col.append(int(t))
                session_col.append(session_no)
                # time spent on this item grows with how far down the funnel it went
                t += rng.lognormal(event_gap_mu, 0.9) * (1 + stage)
                current = item
            session_no += 1
        bar.update()
    bar.close()

    events = pa.table(
        {
            "user_idx": np.asarray(user_col, dtype=np.int32),
            "item_idx": np.asarray(item_col, dtype=np.int32),
            "event_type": pa.array(np.asarray(FUNNEL, dtype=object)[np.asarray(type_col, dtype=np.int64)], type=pa.string()),
            "ts": np.asarray(ts_col, dtype=np.int64),
        }
    )
    users = pa.table({"user_idx": np.arange(1, cfg.n_users + 1, dtype=np.int32), "user_id": _ids("u", cfg.n_users)})
    items = pa.table(
        {
            "item_idx": np.arange(1, cfg.n_items + 1, dtype=np.int32),
            "item_id": _ids("sku", cfg.n_items),
            "attributes": pa.array(attributes, type=pa.list_(pa.int32())),
        }
    )
    return SynthShop(cfg, users, items, events, category, weight, successors, np.asarray(session_col, dtype=np.int64))


def write_synth(out: str | os.PathLike, cfg: SynthConfig = SynthConfig()) -> dict:
    """Generate the shop and write it as a dataset directory (+ `synth_config.json`); returns a summary."""
    shop = generate_shop(cfg)
    path = write_dataset(
        out, shop.users, shop.items, shop.events, name=f"synth-seed{cfg.seed}", source_format="synth", has_timestamps=True
    )
    (path / "synth_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    meta = json.loads((path / "dataset.json").read_text())
    counts = dict(zip(*np.unique(shop.events["event_type"].to_numpy(zero_copy_only=False), return_counts=True)))
    return {
        "out": str(path),
        "source_format": "synth",
        **{k: meta[k] for k in ("n_users", "n_items", "n_attributes", "n_events", "has_timestamps")},
        "event_counts": {t: int(counts.get(t, 0)) for t in FUNNEL},
        "seed": cfg.seed,
    }

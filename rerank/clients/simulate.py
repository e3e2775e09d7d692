"""A live simulator with ground truth: simulated shoppers of the synthetic shop use a running service.

Each request: a user (activity Zipf-like over users) gets `n_candidates` retrieved items, the
service ranks them (POST /rank), the user examines and clicks by a known choice model, and the
click / cart / purchase events go back (POST /events) with `request_id` and `position`. Because
the choice model is known, every shown list has a ground-truth quality (expected clicks), so arms
of an experiment can be compared against the truth, not only against each other.

The choice model (`ChoiceModel`), per shown item i at position p (1-based):

* examine(p) = (1/p) ** eta (position bias);
* attract(i) = sigmoid(b0 + propensity_u + b_interest * log(n_categories * interest[cat(i)] + eps)
  + b_successor * [i succeeds one of the user's last `memory` clicks] + b_pop * log(weight_i / mean weight)),
  with propensity_u ~ Normal(0, propensity_sd) per user (0 by default: all users alike);
* click = examined and attracted (independent draws); after a click, cart with `cart_rate`,
  then purchase with `purchase_rate` (the synth shop's funnel). A purchase's value is the price.

Users' interests are Dirichlet draws with the shop's concentration and DRIFT like the shop's
(`Drift`). Prices are not in the shop, so they are derived from the price-band attribute:
price = 10 * 1.8 ** band (band 0..n_price_bands-1: 10, 18, 32.4, 58.3, 105.0 with 5 bands).

Reproducible per seed (users, candidates and choices of request i come from (seed, i)) up to
the interleaving of concurrent requests, which changes the order in which users' memories grow.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq

from rerank.clients.retry import RetryPolicy, post_with_retries as post
from rerank.data.synth import SynthConfig, generate_shop
from rerank.infra.progress import progress_bar
from rerank.infra.stats import percentile

PRICE_BASE = 10.0
PRICE_GROWTH = 1.8  # price = PRICE_BASE * PRICE_GROWTH ** band
MAX_RETRIES = 3
MAX_RETRY_AFTER_S = 30.0


@dataclass
class ShopTruth:
    """The synthetic shop's ground truth, indexed by item_idx (row 0 = padding)."""

    item_ids: list[str]  # item_idx -> the dataset's item id ("" for row 0)
    category: np.ndarray  # int, 0..n_categories-1
    weight: np.ndarray  # Zipf popularity weight (row 0 = 0)
    successors: np.ndarray  # (n_items+1, successors_per_item) item_idx
    price: np.ndarray  # PRICE_BASE * PRICE_GROWTH ** price band (row 0 = 0)
    n_categories: int
    interest_concentration: float  # the shop's Dirichlet alpha of user interests
    index: dict[str, int] = field(init=False, repr=False)  # item id -> item_idx
    members: list[np.ndarray] = field(init=False, repr=False)  # item_idx of each category
    members_cdf: list[np.ndarray] = field(init=False, repr=False)  # cumulative popularity share in each

    def __post_init__(self) -> None:
        self.index = {item_id: idx for idx, item_id in enumerate(self.item_ids) if idx}
        items = np.arange(1, self.n_items + 1)
        self.members = [items[self.category[1:] == c] for c in range(self.n_categories)]
        self.members_cdf = [np.cumsum(self.weight[m]) / self.weight[m].sum() for m in self.members]

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @classmethod
    def from_dataset(cls, path: str | os.PathLike) -> ShopTruth:
        """Regenerate the shop of a dataset directory written by `rerank.data.synth.write_synth`."""
        root = Path(path)
        config_path = root / "synth_config.json"
        if not config_path.is_file():
            raise ValueError(f"{root}: no synth_config.json, not a synthetic shop (see `rerank data synth`)")
        raw = json.loads(config_path.read_text())
        cfg = SynthConfig(**{**raw, "successor_weights": tuple(raw["successor_weights"])})
        shop = generate_shop(cfg)
        items = pq.read_table(root / "items.parquet", columns=["item_idx", "item_id", "attributes"]).sort_by("item_idx")
        if items.num_rows != cfg.n_items or items["item_idx"].to_pylist() != list(range(1, cfg.n_items + 1)):
            raise ValueError(f"{root}: items.parquet does not match synth_config.json ({items.num_rows} items)")
        first_band_attr = cfg.categories * (1 + cfg.brands_per_category) + 1
        band = np.array([attrs[2] - first_band_attr for attrs in items["attributes"].to_pylist()])
        price = np.concatenate([[0.0], np.round(PRICE_BASE * PRICE_GROWTH**band, 2)])
        return cls(
            item_ids=["", *items["item_id"].to_pylist()],
            category=shop.item_category.astype(np.int64),
            weight=shop.item_weight,
            successors=shop.successors.astype(np.int64),
            price=price,
            n_categories=cfg.categories,
            interest_concentration=cfg.interest_concentration,
        )

    def with_new_successors(self, seed: int) -> ShopTruth:
        """The same shop after its "what follows what" pattern changed: every item gets new
        successors, drawn uniformly from its own category (two) and the next one (the rest), as
        the shop draws them. A model trained before the change cannot know them; one that keeps
        learning from the clicks can."""
        rng = np.random.default_rng(seed)
        successors = np.zeros_like(self.successors)
        k = self.successors.shape[1]
        for i in range(1, self.n_items + 1):
            same = self.members[self.category[i]]
            same = same[same != i]
            nxt = self.members[(self.category[i] + 1) % self.n_categories]
            picks = list(rng.choice(same, size=min(k - 1, len(same)), replace=False)) if len(same) else []
            picks += list(rng.choice(nxt, size=k - len(picks)))
            successors[i] = picks
        return ShopTruth(self.item_ids, self.category, self.weight, successors, self.price, self.n_categories,
                         self.interest_concentration)


@dataclass
class SimUser:
    """A simulated shopper: category interests, recent clicks (item_idx, newest last), requests made."""

    user_id: str
    interests: np.ndarray
    recent_clicks: list[int] = field(default_factory=list)
    requests: int = 0
    propensity: float = 0.0  # the user's own shift of every attractiveness logit (some click more)


def new_user(truth: ShopTruth, user_id: str, rng: np.random.Generator, propensity_sd: float = 0.0) -> SimUser:
    """A user with Dirichlet interests at the shop's concentration and a click propensity
    ~ Normal(0, propensity_sd) on the logit scale."""
    interests = rng.dirichlet(np.full(truth.n_categories, truth.interest_concentration))
    return SimUser(user_id, interests, propensity=float(rng.normal(0.0, propensity_sd)) if propensity_sd else 0.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class ChoiceModel:
    """How a simulated user reacts to a shown list (see the module docstring for the formulas).

    Defaults: a favourite category (interest ~0.4 of 20) makes attract ~0.3, an ignored one ~0.03;
    a successor of a recent click adds ~+0.45; the most popular item ~+0.3 over a median one."""

    b0: float = -2.0  # intercept of attractiveness (log-odds)
    b_interest: float = 0.5  # weight of log(n_categories * interest in the item's category + eps)
    eps: float = 0.05  # floor inside that log, so an ignored category is unlikely, not impossible
    b_successor: float = 2.0  # bonus when the item succeeds one of the last `memory` clicks
    b_pop: float = 0.2  # weight of log(item weight / mean weight)
    memory: int = 3  # recent clicks whose successors attract
    propensity_sd: float = 0.0  # users differ in how much they click: logit shift ~ Normal(0, sd) per user
    eta: float = 1.0  # position bias: examine(p) = (1/p) ** eta
    cart_rate: float = 0.3  # P(cart | click), as the synth shop
    purchase_rate: float = 0.4  # P(purchase | cart), as the synth shop

    def examination(self, n: int) -> np.ndarray:
        """P(examined) of positions 1..n."""
        return (1.0 / np.arange(1, n + 1)) ** self.eta

    def attractiveness(self, truth: ShopTruth, user: SimUser, items: np.ndarray) -> np.ndarray:
        """P(click | examined) of each item (item_idx; 0 = unknown item, never clicked)."""
        items = np.asarray(items, dtype=np.int64)
        known = items > 0
        interest = user.interests[truth.category[items]]
        recent = user.recent_clicks[-self.memory :] if self.memory else []
        successor = np.isin(items, truth.successors[recent].ravel()) if recent else np.zeros(len(items), bool)
        popularity = np.log(np.where(known, truth.weight[items], 1.0) / truth.weight[1:].mean())
        logit = (
            self.b0
            + user.propensity
            + self.b_interest * np.log(truth.n_categories * interest + self.eps)
            + self.b_successor * successor
            + self.b_pop * popularity
        )
        return np.where(known, _sigmoid(logit), 0.0)

    def simulate(self, attract: np.ndarray, rng: np.random.Generator) -> Outcome:
        """Draw examinations, clicks, carts and purchases for a list with these attractivenesses."""
        n = len(attract)
        examined = rng.random(n) < self.examination(n)
        clicked = examined & (rng.random(n) < attract)
        carted = clicked & (rng.random(n) < self.cart_rate)
        purchased = carted & (rng.random(n) < self.purchase_rate)
        return Outcome(examined, clicked, carted, purchased)


@dataclass
class Outcome:
    """What the user did at each position of a shown list (boolean arrays, index = position - 1)."""

    examined: np.ndarray
    clicked: np.ndarray
    carted: np.ndarray
    purchased: np.ndarray


def expected_clicks(examine: np.ndarray, attract: np.ndarray) -> float:
    """Ground-truth quality of a shown list: sum over positions of examine * attract."""
    return float(np.sum(examine * attract))


def click_probability(examine: np.ndarray, attract: np.ndarray) -> float:
    """P(at least one click on the list) = 1 - prod(1 - examine * attract)."""
    return float(1.0 - np.prod(1.0 - examine * attract))


def ideal_order(attract: np.ndarray) -> np.ndarray:
    """Indices by decreasing attractiveness: the ranking with the most expected clicks."""
    return np.argsort(-attract, kind="stable")


@dataclass
class Impression:
    """One shown list and what the user did with it (arrays by position)."""

    shown: np.ndarray  # item_idx
    examine: np.ndarray  # P(examined)
    attract: np.ndarray  # P(click | examined)
    ideal: np.ndarray  # attractiveness of the best len(shown) candidates, best first
    outcome: Outcome
    revenue: float  # price sum of the purchased items


def react(
    truth: ShopTruth, model: ChoiceModel, user: SimUser, candidates: np.ndarray, shown: np.ndarray,
    rng: np.random.Generator,
) -> Impression:
    """Simulate `user` on the list `shown` (ranked from `candidates`) and remember its clicks."""
    attract = model.attractiveness(truth, user, shown)
    pool = model.attractiveness(truth, user, candidates)
    outcome = model.simulate(attract, rng)
    remember_clicks(user, shown[outcome.clicked], model.memory)
    return Impression(
        shown=shown,
        examine=model.examination(len(shown)),
        attract=attract,
        ideal=pool[ideal_order(pool)][: len(shown)],
        outcome=outcome,
        revenue=float(truth.price[shown][outcome.purchased].sum()),
    )


@dataclass
class Drift:
    """Interest drift: every `every` requests of a user, with `probability`, a `share` of the
    interest vector is replaced by a fresh Dirichlet draw (as the synth shop between sessions)."""

    every: int = 20
    probability: float = 0.3
    share: float = 0.5


def maybe_drift(truth: ShopTruth, user: SimUser, drift: Drift, rng: np.random.Generator) -> bool:
    """Count a request of `user` and drift its interests when due; True when they drifted."""
    user.requests += 1
    if drift.every <= 0 or user.requests % drift.every or rng.random() >= drift.probability:
        return False
    fresh = rng.dirichlet(np.full(truth.n_categories, truth.interest_concentration))
    user.interests = (1 - drift.share) * user.interests + drift.share * fresh
    return True


def remember_clicks(user: SimUser, clicked_items: np.ndarray, memory: int) -> None:
    """Append clicked items (in position order) to the user's recent clicks, keeping `memory`."""
    user.recent_clicks = [*user.recent_clicks, *(int(i) for i in clicked_items)][-max(memory, 1) :]


@dataclass
class CandidateMix:
    """Where a request's candidates come from ("retrieval"), as shares of `n_candidates`.

    interest: category by the user's interests, then item by popularity in it; successors: of
    the user's recent clicks; popular: by popularity weight; random: uniform. A source that
    runs short leaves its share to the next ones; uniform random items fill whatever is left."""

    interest: float = 0.5
    successors: float = 0.15
    popular: float = 0.2
    random: float = 0.15

    def quotas(self, n: int) -> list[int]:
        """Items per source (interest, successors, popular, random), summing to n."""
        shares = np.array([self.interest, self.successors, self.popular, self.random], dtype=float)
        if (shares < 0).any() or shares.sum() <= 0:
            raise ValueError(f"candidate shares must be >= 0 and not all 0, got {shares.tolist()}")
        counts = np.floor(shares / shares.sum() * n).astype(int)
        counts[-1] += n - counts.sum()
        return counts.tolist()


def _interest_items(truth: ShopTruth, user: SimUser, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` draws (with repeats): a category by the user's interests, then an item by popularity in it."""
    cats = rng.choice(truth.n_categories, size=n, p=user.interests / user.interests.sum())
    picks = []
    for c, count in zip(*np.unique(cats, return_counts=True)):
        ranks = np.searchsorted(truth.members_cdf[c], rng.random(count))
        picks.append(truth.members[c][np.minimum(ranks, len(truth.members[c]) - 1)])
    return rng.permutation(np.concatenate(picks)) if picks else np.empty(0, np.int64)


def draw_candidates(
    truth: ShopTruth, user: SimUser, n: int, mix: CandidateMix, rng: np.random.Generator, memory: int = 3
) -> np.ndarray:
    """`n` unique item_idx (at most the catalogue) from the sources of `mix`, shuffled."""
    n = min(n, truth.n_items)
    quotas = mix.quotas(n)
    everything = np.arange(1, truth.n_items + 1)
    recent = user.recent_clicks[-memory:]
    sources = [
        _interest_items(truth, user, 3 * quotas[0], rng),
        rng.permutation(np.unique(truth.successors[recent].ravel())) if recent else np.empty(0, np.int64),
        rng.choice(everything, size=min(3 * quotas[2], truth.n_items), replace=False,
                   p=truth.weight[1:] / truth.weight[1:].sum()),
        rng.permutation(everything),
    ]
    chosen: dict[int, None] = {}  # insertion-ordered set
    target = 0
    for quota, pool in zip(quotas, sources):
        target += quota
        for item in pool:
            if len(chosen) >= target:
                break
            chosen.setdefault(int(item), None)
    return rng.permutation(np.fromiter(chosen, dtype=np.int64, count=len(chosen)))


def rank_body(truth: ShopTruth, user: SimUser, candidates: np.ndarray, k: int) -> dict:
    """The POST /rank body of one request (default rules)."""
    return {"user_id": user.user_id, "candidates": [truth.item_ids[c] for c in candidates], "k": k}


def events_payload(
    user_id: str, answer: dict, outcome: Outcome, event_prefix: str, ts: float, prices: list[float],
    post_views: bool = False,
) -> list[dict]:
    """The events of one impression for POST /events: per position (1-based), a view when
    examined (with `post_views`), then click, cart and purchase (with `value` = its price).
    `prices` are the shown items' prices; event ids are `{event_prefix}-{position}-{type}`."""
    events = []
    stages = [("click", outcome.clicked), ("cart", outcome.carted), ("purchase", outcome.purchased)]
    if post_views:
        stages.insert(0, ("view", outcome.examined))
    for index, item in enumerate(answer["items"]):
        position = index + 1
        for kind, happened in stages:
            if not happened[index]:
                continue
            event = {"event_id": f"{event_prefix}-{position}-{kind}", "user_id": user_id, "item_id": item["item_id"],
                     "type": kind, "ts": ts, "request_id": answer["request_id"], "position": position}
            if kind == "purchase":
                event["value"] = prices[index]
            events.append(event)
    return events


@dataclass
class SimConfig:
    """One simulation run against the service at `url`."""

    url: str = "http://127.0.0.1:8000"
    n_users: int = 200
    requests: int = 1000  # total /rank requests
    concurrency: int = 8
    rate: float | None = None  # requests/s (request i starts at i / rate); None = as fast as answered
    k: int = 10
    n_candidates: int = 100
    seed: int = 0
    user_prefix: str | None = None  # None = f"sim{seed}-"
    api_key: str | None = None
    post_views: bool = False  # also post a view event for each examined item
    user_activity: float = 0.8  # P(user of rank r makes a request) ~ 1 / r ** user_activity; 0 = uniform
    choice: ChoiceModel = field(default_factory=ChoiceModel)
    drift: Drift = field(default_factory=Drift)
    candidates: CandidateMix = field(default_factory=CandidateMix)
    timeout_s: float = 10.0
    truth_every: int = 1000  # requests per window of each arm's ground-truth series (expected_ctr_by_window)

    @property
    def prefix(self) -> str:
        return f"sim{self.seed}-" if self.user_prefix is None else self.user_prefix


@dataclass
class ArmStats:
    """Totals of one arm (the answer's `arm`)."""

    impressions: int = 0
    clicks: int = 0
    clicked_impressions: int = 0
    carts: int = 0
    purchases: int = 0
    revenue: float = 0.0
    click_probability: float = 0.0  # sums over impressions, ground truth
    expected_clicks: float = 0.0
    ideal_expected_clicks: float = 0.0
    by_window: dict[int, list[float]] = field(default_factory=dict)  # window -> [click_probability sum, impressions]
    # (window w = requests w * truth_every .. (w + 1) * truth_every - 1 of the run)

    def add(self, impression: Impression, window: int = 0) -> None:
        outcome, examine, attract = impression.outcome, impression.examine, impression.attract
        totals = self.by_window.setdefault(window, [0.0, 0])
        totals[0] += click_probability(examine, attract)
        totals[1] += 1
        self.impressions += 1
        self.clicks += int(outcome.clicked.sum())
        self.clicked_impressions += int(outcome.clicked.any())
        self.carts += int(outcome.carted.sum())
        self.purchases += int(outcome.purchased.sum())
        self.revenue += impression.revenue
        self.click_probability += click_probability(examine, attract)
        self.expected_clicks += expected_clicks(examine, attract)
        self.ideal_expected_clicks += expected_clicks(examine, impression.ideal)

    def summary(self) -> dict:
        n = max(self.impressions, 1)
        return {
            "impressions": self.impressions,
            "clicks": self.clicks,
            "clicked_impressions": self.clicked_impressions,
            "ctr": round(self.clicked_impressions / n, 4),
            "expected_ctr": round(self.click_probability / n, 4),
            "expected_clicks": round(self.expected_clicks / n, 4),
            "ideal_expected_clicks": round(self.ideal_expected_clicks / n, 4),
            "carts": self.carts,
            "purchases": self.purchases,
            "revenue": round(self.revenue, 2),
            "revenue_per_impression": round(self.revenue / n, 4),
            "expected_ctr_by_window": {str(window): round(total / count, 4)
                                       for window, (total, count) in sorted(self.by_window.items())},
        }


@dataclass
class RunStats:
    """Counters of a whole run."""

    requests: int = 0
    ok: int = 0
    degraded: int = 0
    retries: int = 0
    events_posted: int = 0
    events_duplicates: int = 0
    unknown_items: int = 0
    errors: dict[str, Counter] = field(default_factory=lambda: {"rank": Counter(), "events": Counter()})
    latencies_ms: list[float] = field(default_factory=list)
    arms: dict[str, ArmStats] = field(default_factory=dict)
    experiments: Counter = field(default_factory=Counter)


# a 503's Retry-After (capped at MAX_RETRY_AFTER_S; none: not retried), 0.5 s * 2**attempt after a
# connection error or a timeout (event ids make retried events safe); nothing else
RETRY = RetryPolicy(retries=MAX_RETRIES, exceptions=(httpx.TransportError,), backoff_s=0.5, growth=2.0,
                    retry_after_max_s=MAX_RETRY_AFTER_S)


def retry_delay(failure: httpx.Response | httpx.TransportError, attempt: int) -> float | None:
    """Seconds to wait before retrying a failed attempt (0-based), None = do not retry (`RETRY`)."""
    return RETRY.delay(failure, attempt)


async def post_with_retries(
    client: httpx.AsyncClient, url: str, body: dict, stats: RunStats, kind: str
) -> tuple[httpx.Response | None, float]:
    """POST `body`, retrying by `RETRY`. Returns the 200 response (None after counting the
    error in `stats.errors[kind]`, by status code or exception class name) and the last attempt's ms."""
    result = await post(client, url, body, RETRY)
    stats.retries += result.retries
    if result.response is None:
        stats.errors[kind][result.error] += 1
    return result.response, result.ms


@dataclass
class _Run:
    """The shared state of one run's workers."""

    truth: ShopTruth
    cfg: SimConfig
    client: httpx.AsyncClient
    users: list[SimUser]
    schedule: np.ndarray  # user index of each request
    run_id: str
    stats: RunStats = field(default_factory=RunStats)
    next_request: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def base_url(self) -> str:
        return self.cfg.url.rstrip("/")


async def _one_request(run: _Run, i: int) -> None:
    truth, cfg, stats = run.truth, run.cfg, run.stats
    rng = np.random.default_rng([cfg.seed, i])
    user = run.users[run.schedule[i]]
    maybe_drift(truth, user, cfg.drift, rng)
    candidates = draw_candidates(truth, user, cfg.n_candidates, cfg.candidates, rng, cfg.choice.memory)
    answer = await _rank(run, user, candidates)
    if answer is None:
        return
    shown = np.array([truth.index.get(str(item["item_id"]), 0) for item in answer["items"]], dtype=np.int64)
    stats.unknown_items += int((shown == 0).sum())
    impression = react(truth, cfg.choice, user, candidates, shown, rng)
    stats.arms.setdefault(answer.get("arm") or "default", ArmStats()).add(impression, i // max(cfg.truth_every, 1))
    prices = truth.price[shown].tolist()
    events = events_payload(user.user_id, answer, impression.outcome, f"{run.run_id}-{i}", time.time(), prices,
                            cfg.post_views)
    if events:
        await _post_events(run, events)


async def _rank(run: _Run, user: SimUser, candidates: np.ndarray) -> dict | None:
    """POST /rank; the answer, or None (counted in the run's errors)."""
    stats = run.stats
    body = rank_body(run.truth, user, candidates, run.cfg.k)
    stats.requests += 1
    response, latency_ms = await post_with_retries(run.client, f"{run.base_url}/rank", body, stats, "rank")
    if response is None:
        return None
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not {"items", "request_id"} <= answer.keys():
        stats.errors["rank"]["bad answer"] += 1
        return None
    stats.ok += 1
    stats.latencies_ms.append(latency_ms)  # of the answered attempt
    stats.degraded += bool(answer.get("degraded"))
    stats.experiments[answer.get("experiment") or ""] += 1
    return answer


async def _post_events(run: _Run, events: list[dict]) -> None:
    response, _ = await post_with_retries(run.client, f"{run.base_url}/events", {"events": events}, run.stats, "events")
    if response is not None:
        reply = response.json()
        run.stats.events_posted += int(reply.get("accepted", 0))
        run.stats.events_duplicates += int(reply.get("duplicates", 0))


async def _worker(run: _Run, bar) -> None:
    while run.next_request < run.cfg.requests:
        i = run.next_request
        run.next_request += 1
        if run.cfg.rate:
            await asyncio.sleep(max(0.0, run.started + i / run.cfg.rate - time.perf_counter()))
        await _one_request(run, i)
        bar.update()


def user_schedule(n_users: int, requests: int, activity: float, rng: np.random.Generator) -> np.ndarray:
    """The user (index) of each request: P(user of rank r) ~ 1 / r ** activity, ranks shuffled."""
    weights = 1.0 / np.arange(1, n_users + 1) ** activity
    return rng.permutation(n_users)[rng.choice(n_users, size=requests, p=weights / weights.sum())]


def _summary(run: _Run, wall_s: float) -> dict:
    stats = run.stats
    return {
        "url": run.cfg.url,
        "run_id": run.run_id,
        "requests": stats.requests,
        "ok": stats.ok,
        "errors": {kind: dict(counter) for kind, counter in stats.errors.items()},
        "retries": stats.retries,
        "degraded": stats.degraded,
        "events_posted": stats.events_posted,
        "events_duplicates": stats.events_duplicates,
        "unknown_items": stats.unknown_items,
        "experiments": dict(stats.experiments),
        "arms": {name: arm.summary() for name, arm in sorted(stats.arms.items())},
        "latency_ms": {f"p{q}": percentile(stats.latencies_ms, q, digits=2) for q in (50, 90, 99)},
        "wall_s": round(wall_s, 3),
        "rate": round(stats.requests / wall_s, 2) if wall_s > 0 else None,
        "config": {k: v for k, v in asdict(run.cfg).items() if k != "api_key"},
    }


async def run_simulation(truth: ShopTruth, cfg: SimConfig, progress: bool = True) -> dict:
    """Simulate `cfg.requests` requests of `cfg.n_users` users against the service; the JSON summary."""
    if cfg.n_users < 1 or cfg.requests < 0 or cfg.concurrency < 1 or cfg.k < 1 or cfg.n_candidates < 1:
        raise ValueError("need n_users >= 1, requests >= 0, concurrency >= 1, k >= 1 and n_candidates >= 1")
    rng = np.random.default_rng(cfg.seed)
    users = [new_user(truth, f"{cfg.prefix}{u}", rng, cfg.choice.propensity_sd) for u in range(1, cfg.n_users + 1)]
    schedule = user_schedule(cfg.n_users, cfg.requests, cfg.user_activity, rng)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=cfg.timeout_s, limits=limits) as client:
        run = _Run(truth, cfg, client, users, schedule, uuid.uuid4().hex[:12])
        with progress_bar(total=cfg.requests, desc="simulate", unit="req", enabled=progress) as bar:
            await asyncio.gather(*(_worker(run, bar) for _ in range(cfg.concurrency)))
    return _summary(run, time.perf_counter() - run.started)


def simulate(data: str | os.PathLike | ShopTruth, cfg: SimConfig, progress: bool = True) -> dict:
    """Synchronous `run_simulation`; `data` is a synth dataset directory or a loaded ShopTruth."""
    truth = data if isinstance(data, ShopTruth) else ShopTruth.from_dataset(data)
    return asyncio.run(run_simulation(truth, cfg, progress))

"""HTTP request/response models of the serving API (pydantic; no Ray, no FastAPI).

Ids are the shop's: strings or integers on the wire, always strings inside (so
`17` and `"17"` name the same item). Unknown fields are refused (extra="forbid"),
so a typo such as `"canditates"` gets a 422 that names it instead of being ignored.
Limits that depend on the deployment (max_candidates, the whole-catalogue cap) are
checked by `check_rank_limits`, which raises `RequestLimitError` naming the field.

Every number in a request must be finite: NaN, Infinity and overflowing literals such
as `1e309` (which Python's JSON parser turns into inf) are a 422 naming the field
(`allow_inf_nan=False` on every request model), so one bad request can never produce a
score that cannot be rendered as JSON inside a shared ingress batch.

Bounds (module constants, so the ingress, the docs and the tests use one number):
`rules.exclude` <= MAX_EXCLUDE ids, `rules.boost` <= MAX_BOOST_ENTRIES entries with
|value| <= MAX_ABS_BOOST, `context` <= MAX_CONTEXT_KEYS keys of JSON scalars and
<= MAX_CONTEXT_BYTES serialized, `k` <= MAX_K, events <= MAX_EVENTS_PER_REQUEST, and the
raw body <= MAX_BODY_BYTES (enforced by the ingress before parsing; `check_body_size`).
User and item ids are at most MAX_ID_LENGTH characters: the store's constant
(rerank.store.events.MAX_ID_LENGTH), so the API and the store refuse the same ids.

An event's `ts` must lie between `EventTsBounds.min_ts` and `max_future_skew_s` seconds ahead of the
server clock, checked when the request is validated (`configure_event_ts` sets a deployment's
bounds; defaults MIN_EVENT_TS and MAX_FUTURE_SKEW_S): a far-future ts (e.g. milliseconds sent as
seconds) would otherwise stretch every time range computed from events, such as the experiment
readout's looks (one click at ts 2e9 made it step through ~70k hourly looks). Old timestamps are
accepted by default: replaying a dataset with its own clock (`rerank replay --original-ts`,
MovieLens from 1997) sends them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from rerank.data.dataset import EVENT_TYPES
from rerank.store.events import MAX_ID_LENGTH

MAX_K = 1000
MAX_EVENTS_PER_REQUEST = 1000
MAX_FUTURE_SKEW_S = 300.0  # an event's ts may be this far ahead of the server clock (clients' clock skew)
MIN_EVENT_TS = 0.0  # the earliest ts accepted by default (Unix seconds)
MAX_EXCLUDE = 1000  # ids in rules.exclude
MAX_BOOST_ENTRIES = 1000  # entries in rules.boost
# |boost| bound. Model scores are O(1..10), so a boost of 1000 already pins an item to the
# top (or the bottom); anything bigger means nothing more, and absurd values (1e308) overflow
# the score arithmetic (inf/NaN scores, the same item returned k times by the diversifiers).
MAX_ABS_BOOST = 1e3
MAX_CONTEXT_KEYS = 32
MAX_CONTEXT_KEY_LENGTH = 64
MAX_CONTEXT_BYTES = 4096  # context as compact UTF-8 JSON
# Whole-catalogue ranking (no `candidates`) scores every item for the user. Above this many
# items the request is refused (send candidates instead); configurable per deployment via
# check_rank_limits(max_catalogue=...). Amazon Beauty (12,101 items) fits.
DEFAULT_MAX_CATALOGUE_ITEMS = 20_000
# Raw request body bound, enforced by the ingress before JSON parsing (413). Valid bodies
# with ASCII ids stay below it under the default limits: /rank with 1000 candidates + 1000
# exclude ids + 1000 boosts, all 256-character ids, is ~0.8 MB; /events with 1000 events of
# maximal ids ~0.75 MB. A deployment that raises max_candidates far above 1000 (or whose ids
# are long non-ASCII strings) needs a bigger body limit.
MAX_BODY_BYTES = 1024 * 1024


def _id_to_str(value: Any) -> Any:
    """Accept str or int ids (not bools, floats or objects) and make them str."""
    if isinstance(value, bool):
        raise ValueError("an id must be a string or an integer, not a boolean")
    if isinstance(value, int):
        return str(value)
    return value


ShopId = Annotated[str, BeforeValidator(_id_to_str), Field(min_length=1, max_length=MAX_ID_LENGTH)]


def _check_boost(value: float) -> float:
    if abs(value) > MAX_ABS_BOOST:
        raise ValueError(
            f"a boost must be between {-MAX_ABS_BOOST:g} and {MAX_ABS_BOOST:g}, got {value:g} (model scores are "
            f"O(1..10), so {MAX_ABS_BOOST:g} already pins an item to the top or the bottom)"
        )
    return value


# finite (NaN/inf refused even without the model config) and bounded
Boost = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_check_boost)]


def _context_scalar(value: Any) -> Any:
    """Context values are JSON scalars: string, finite number, boolean or null."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("context values must be finite numbers (no NaN or Infinity)")
        return value
    kind = {list: "an array", tuple: "an array", dict: "an object"}.get(type(value), type(value).__name__)
    raise ValueError(f"context values must be JSON scalars (string, number, boolean or null), not {kind}")


ContextKey = Annotated[str, Field(min_length=1, max_length=MAX_CONTEXT_KEY_LENGTH)]
ContextValue = Annotated[Any, BeforeValidator(_context_scalar)]
EventType = Literal["view", "click", "cart", "purchase"]
assert EventType.__args__ == EVENT_TYPES  # type: ignore[attr-defined]  # one list of types


class _Strict(BaseModel):
    """Request models: unknown fields and non-finite numbers (NaN, +-Infinity, 1e309) are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RankRules(_Strict):
    """List-level rules applied after scoring (see rerank.serving.ranking.RankingRules)."""

    diversity: float = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="MMR trade-off, 0 = pure score order"
    )
    exclude_purchased: bool = Field(True, description="drop items the user has bought")
    exclude: list[ShopId] = Field(
        default_factory=list, max_length=MAX_EXCLUDE, description=f"item ids never to return (at most {MAX_EXCLUDE})"
    )
    boost: dict[ShopId, Boost] = Field(
        default_factory=dict,
        max_length=MAX_BOOST_ENTRIES,
        description=(
            f"item id -> additive score boost, |boost| <= {MAX_ABS_BOOST:g} (at most {MAX_BOOST_ENTRIES} entries)"
        ),
    )


class RankRequest(_Strict):
    """POST /rank body. `candidates` omitted = rank the whole catalogue."""

    user_id: ShopId
    candidates: list[ShopId] | None = Field(None, description="item ids to re-rank; omitted = whole catalogue")
    k: int = Field(20, ge=1, le=MAX_K, strict=True, description="number of items to return (a JSON integer)")
    context: dict[ContextKey, ContextValue] | None = Field(
        None,
        max_length=MAX_CONTEXT_KEYS,
        description=(
            f"request context (page, device, ...): at most {MAX_CONTEXT_KEYS} keys of JSON scalars, "
            f"{MAX_CONTEXT_BYTES} bytes as JSON; accepted, not used by the ranking yet"
        ),
    )
    rules: RankRules = Field(default_factory=RankRules)

    @field_validator("context")
    @classmethod
    def _context_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
            if size > MAX_CONTEXT_BYTES:
                raise ValueError(f"context is {size} bytes as JSON, at most {MAX_CONTEXT_BYTES} allowed")
        return value

    @field_validator("candidates")
    @classmethod
    def _non_empty_unique(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("candidates must not be empty (omit the field to rank the whole catalogue)")
        seen: set[str] = set()
        for item_id in value:
            if item_id in seen:
                raise ValueError(f"duplicate candidate item id {item_id!r}")
            seen.add(item_id)
        return value


class RequestLimitError(ValueError):
    """A request that is well-formed but over a deployment limit; `field` names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def check_rank_limits(
    request: RankRequest,
    max_candidates: int,
    *,
    catalogue_size: int | None = None,
    max_catalogue: int | None = DEFAULT_MAX_CATALOGUE_ITEMS,
) -> None:
    """Raise RequestLimitError when the request exceeds this deployment's limits.

    max_candidates bounds an explicit `candidates` list. A request without candidates ranks
    the whole catalogue: with `catalogue_size` given (the number of items it would score),
    it is refused when that exceeds `max_catalogue` (None = no cap). Without
    `catalogue_size` the whole-catalogue cap is not checked.
    """
    if request.candidates is not None:
        if len(request.candidates) > max_candidates:
            raise RequestLimitError(
                "candidates", f"{len(request.candidates)} candidates, at most {max_candidates} allowed"
            )
        return
    if catalogue_size is not None and max_catalogue is not None and catalogue_size > max_catalogue:
        raise RequestLimitError(
            "candidates",
            f"the catalogue has {catalogue_size} items and whole-catalogue ranking is limited to "
            f"{max_catalogue}; send candidates (at most {max_candidates})",
        )


def check_body_size(n_bytes: int, max_bytes: int = MAX_BODY_BYTES) -> None:
    """Raise RequestLimitError("body", ...) when a raw request body (or its declared
    Content-Length) is over `max_bytes`; the ingress answers it with 413 before parsing."""
    if n_bytes > max_bytes:
        raise RequestLimitError("body", f"request body is {n_bytes} bytes, at most {max_bytes} allowed")


class RankedItem(BaseModel):
    item_id: str
    score: float


class Timings(BaseModel):
    """Milliseconds: time inside each stage for this request's batch (Redis fetch, forward
    pass, ranking), and `total` from arrival at the ingress to the answer; total minus the
    stages is the batch wait and the handle hops."""

    features: float
    score: float
    rank: float
    total: float


class RankResponse(BaseModel):
    items: list[RankedItem]
    model_version: str
    feature_age_ms: float | None = Field(description="now - the user's last event; null for a user with none")
    degraded: bool = Field(description="true when the feature store was unreachable (no-history ranking)")
    timings_ms: Timings
    request_id: str = Field(description="names this answer: send it with the events it leads to (attribution)")
    experiment: str = Field(description="the experiment the user is in; empty outside experiments")
    arm: str = Field(description="the user's arm ('default' outside experiments, 'interleaved' under interleaving)")
    scorer_batch_size: int = Field(description="number of requests scored in the same forward pass")


@dataclass(frozen=True)
class EventTsBounds:
    """The range of an event's `ts`: at least `min_ts`, at most now + `max_future_skew_s`."""

    max_future_skew_s: float = MAX_FUTURE_SKEW_S
    min_ts: float = MIN_EVENT_TS

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_future_skew_s) and self.max_future_skew_s >= 0):
            raise ValueError(f"max_future_skew_s must be a finite number >= 0, got {self.max_future_skew_s}")
        if not (math.isfinite(self.min_ts) and self.min_ts >= 0):
            raise ValueError(f"min_ts must be a finite number >= 0, got {self.min_ts}")

    def check(self, ts: float, now: float | None = None) -> float:
        """ts, or ValueError saying what is wrong with it."""
        now = time.time() if now is None else now
        if ts > now + self.max_future_skew_s:
            hint = " (milliseconds? ts is Unix seconds)" if ts > 1e11 else ""
            raise ValueError(f"ts {ts:.17g} is {ts - now:.0f} s ahead of the server clock; at most "
                             f"{self.max_future_skew_s:g} s ahead is accepted{hint}")
        if ts < self.min_ts:
            raise ValueError(f"ts {ts:.17g} is before the earliest accepted ts {self.min_ts:.17g} (Unix seconds)")
        return ts


_event_ts_bounds = EventTsBounds()


def configure_event_ts(bounds: EventTsBounds) -> EventTsBounds:
    """Set this process' event ts bounds (an ingress replica does it once, from its settings);
    returns the previous ones. Validation with a context {"event_ts_bounds": EventTsBounds(...)}
    uses that instead."""
    global _event_ts_bounds
    previous, _event_ts_bounds = _event_ts_bounds, bounds
    return previous


def event_ts_bounds() -> EventTsBounds:
    """The bounds EventIn.ts is validated against in this process."""
    return _event_ts_bounds


class EventIn(_Strict):
    """One behaviour event. `event_id` makes retries idempotent; `ts` is Unix seconds (default now).
    `request_id` (+ `position`) attribute it to the ranking that showed the item; without it the
    user's last impression of the item within the attribution window is used."""

    event_id: str | None = Field(None, min_length=1, max_length=128)
    user_id: ShopId
    item_id: ShopId
    type: EventType
    ts: float | None = Field(None, ge=0.0, allow_inf_nan=False, strict=True,  # a number, not true/false
                             description="Unix seconds; at most max_future_skew_s (default 300) ahead of the "
                             "server clock")
    request_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[0-9a-f]+$",
                                   description="the /rank answer that showed the item (its request_id)")
    position: int | None = Field(None, ge=1, le=MAX_K, strict=True,
                                 description="1-based position of the item in that answer (as the client saw it)")
    value: float | None = Field(None, ge=0.0, le=1e9, allow_inf_nan=False,
                                description="revenue of a purchase (for the experiment readout)")

    @field_validator("ts")
    @classmethod
    def _ts_in_bounds(cls, value: float | None, info: ValidationInfo) -> float | None:
        """Not before the earliest accepted ts, not further ahead of the server clock than the skew."""
        if value is None:
            return value
        context = info.context if isinstance(info.context, dict) else {}
        return context.get("event_ts_bounds", _event_ts_bounds).check(value)


class EventsRequest(_Strict):
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)


class EventsResponse(BaseModel):
    accepted: int = Field(description="events newly stored")
    duplicates: int = Field(description="events whose event_id was already stored (not applied again)")


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    redis: bool
    model_loaded: bool
    model_version: str | None
    trainer: dict[str, Any] | None = Field(
        None, description="the online trainer: state (training|standby|paused|backoff|...), version, lag_events, "
        "error; null when the app runs without one")


class ModelInfo(BaseModel):
    """GET /model: which weights the scorer serves and how fresh they are."""

    model_config = ConfigDict(protected_namespaces=())

    version: str
    kind: str
    source: str = Field(description="model directory or registry URI it was loaded from")
    loaded_at: float = Field(description="Unix time the scorer swapped these weights in")
    trained_until: float | None = Field(None, description="timestamp of the last event the weights saw")
    meta: dict[str, Any] = Field(default_factory=dict, description="registry metadata (online trainer)")
    freshness: dict[str, Any] = Field(
        default_factory=dict,
        description="version_age_s, serving_for_s, newest_event_to_serving_s, events_behind_head (rerank.online.freshness.model_freshness)",
    )


class RollbackRequest(_Strict):
    """POST /admin/rollback: serve (and pin) an earlier registry version, or release the pin."""

    version: int | None = Field(None, ge=1, description="registry version to serve and pin")
    unpin: bool = Field(False, description="release a rollback pin instead (the trainer continues from it)")
    reason: str | None = Field(None, max_length=200)

"""HTTP request/response models of the serving API (pydantic; no Ray, no FastAPI).

Ids are the shop's: strings or integers on the wire, always strings inside (so
`17` and `"17"` name the same item). Unknown fields are refused (extra="forbid"),
so a typo such as `"canditates"` gets a 422 that names it instead of being ignored.
Limits that depend on the deployment (max_candidates) are checked by
`check_rank_limits`, which raises `RequestLimitError` naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from rerank.dataset import EVENT_TYPES

MAX_K = 1000
MAX_EVENTS_PER_REQUEST = 1000


def _id_to_str(value: Any) -> Any:
    """Accept str or int ids (not bools, floats or objects) and make them str."""
    if isinstance(value, bool):
        raise ValueError("an id must be a string or an integer, not a boolean")
    if isinstance(value, int):
        return str(value)
    return value


ShopId = Annotated[str, BeforeValidator(_id_to_str), Field(min_length=1, max_length=256)]
EventType = Literal["view", "click", "cart", "purchase"]
assert EventType.__args__ == EVENT_TYPES  # type: ignore[attr-defined]  # one list of types


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RankRules(_Strict):
    """List-level rules applied after scoring (see rerank.ranking.RankingRules)."""

    diversity: float = Field(0.0, ge=0.0, le=1.0, description="MMR trade-off, 0 = pure score order")
    exclude_purchased: bool = Field(True, description="drop items the user has bought")
    exclude: list[ShopId] = Field(default_factory=list, description="item ids never to return")
    boost: dict[ShopId, float] = Field(default_factory=dict, description="item id -> additive score boost")


class RankRequest(_Strict):
    """POST /rank body. `candidates` omitted = rank the whole catalogue."""

    user_id: ShopId
    candidates: list[ShopId] | None = Field(None, description="item ids to re-rank; omitted = whole catalogue")
    k: int = Field(20, ge=1, le=MAX_K, description="number of items to return")
    context: dict[str, Any] | None = Field(
        None, description="free-form request context (page, device, ...); accepted, not used by the ranking yet"
    )
    rules: RankRules = Field(default_factory=RankRules)

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


def check_rank_limits(request: RankRequest, max_candidates: int) -> None:
    """Raise RequestLimitError when the request exceeds this deployment's limits."""
    if request.candidates is not None and len(request.candidates) > max_candidates:
        raise RequestLimitError(
            "candidates", f"{len(request.candidates)} candidates, at most {max_candidates} allowed"
        )


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
    request_id: str
    variant: str = Field(description="experiment variant this user is assigned to")
    scorer_batch_size: int = Field(description="number of requests scored in the same forward pass")


class EventIn(_Strict):
    """One behaviour event. `event_id` makes retries idempotent; `ts` is Unix seconds (default now)."""

    event_id: str | None = Field(None, min_length=1, max_length=128)
    user_id: ShopId
    item_id: ShopId
    type: EventType
    ts: float | None = Field(None, ge=0.0)


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
        description="version_age_s, serving_for_s, newest_event_to_serving_s, events_behind_head (rerank.online.model_freshness)",
    )


class RollbackRequest(BaseModel):
    """POST /admin/rollback: serve (and pin) an earlier registry version, or release the pin."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=1, description="registry version to serve and pin")
    unpin: bool = Field(False, description="release a rollback pin instead (the trainer continues from it)")
    reason: str | None = Field(None, max_length=200)

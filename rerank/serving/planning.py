"""Pure functions of one request, without Ray or handles (what the Ingress decides before any hop).

- `arm_rules` / `rank_plan`: how a /rank request is ranked in the user's experiment arm (its
  rules, the model(s) that score it; rerank.serving.pipeline.RankPlan);
- `attributed_event`: the stored form of a /events event, with its attribution fields;
- `readout_weights`: the A/B weights the experiment readout checks the sample ratio against.
"""

from __future__ import annotations

from rerank.experiments.attribution import Attribution
from rerank.experiments.book import Assignment, ExperimentSpec
from rerank.serving.api import EventIn, RankRequest
from rerank.serving.pipeline import RankPlan
from rerank.serving.ranking import RankingRules
from rerank.store import entry
from rerank.store.events import Event


def arm_rules(body: RankRequest, assignment: Assignment, arm: str) -> RankingRules:
    """The request's rules, with the arm's defaults where the request does not set them."""
    diversity = body.rules.diversity
    arm_spec = assignment.spec.arms[arm] if assignment.spec is not None else None
    if "diversity" not in body.rules.model_fields_set and arm_spec is not None and arm_spec.rules.diversity is not None:
        diversity = arm_spec.rules.diversity
    return RankingRules(k=body.k, diversity=diversity, exclude_purchased=body.rules.exclude_purchased,
                        exclude_items=list(body.rules.exclude), boost=dict(body.rules.boost))


def rank_plan(body: RankRequest, assignment: Assignment, request_id: str, models: bool = True) -> RankPlan:
    """How this request is ranked in its arm. `models=False` (split layout): arms differ in rules only."""
    spec = assignment.spec
    if spec is None:
        return RankPlan.single(arm_rules(body, assignment, ""))
    if assignment.interleaved and models:
        names = tuple(spec.arms)
        return RankPlan(tuple(arm_rules(body, assignment, n) for n in names),
                        tuple(spec.arms[n].model_key for n in names), teams=names, request_id=request_id)
    if assignment.interleaved:
        return RankPlan.single(arm_rules(body, assignment, next(iter(spec.arms))))
    key = spec.arms[assignment.arm].model_key if models else ""
    return RankPlan.single(arm_rules(body, assignment, assignment.arm), key)


def attributed_event(event: EventIn, hit: Attribution, assignment: Assignment | None = None) -> Event:
    """The event as stored, with its attribution fields: the impression that showed the item
    (`hit`, found by request_id or within the window), or else, when `hit` is empty, the user's
    current `assignment` with the client's request_id / position kept."""
    if hit.how:
        extra = hit.fields()
    else:  # not shown by us (or too long ago): the user's arm, the client's claim kept
        assignment = assignment if assignment is not None else Assignment()
        extra = {entry.REQUEST_ID: event.request_id or "",
                 entry.POSITION: "" if event.position is None else str(event.position),
                 entry.EXPERIMENT: assignment.experiment, entry.ARM: assignment.arm, entry.TEAM: "",
                 entry.ATTRIBUTED: ""}
    extra[entry.VALUE] = "" if event.value is None else repr(float(event.value))
    return Event(user_id=event.user_id, item_id=event.item_id, type=event.type, ts=event.ts, event_id=event.event_id,
                 extra=extra)


def readout_weights(spec: ExperimentSpec | None) -> dict[str, float] | None:
    """An A/B experiment's configured arm weights (the readout's sample ratio check); None for
    an interleaving experiment or one not in the book."""
    if spec is None or spec.type != "ab":
        return None
    return {arm: a.weight for arm, a in spec.arms.items()}

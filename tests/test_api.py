"""The HTTP models (rerank.api), variant assignment, and the serving helpers without Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from rerank.api import EventsRequest, RankRequest, RequestLimitError, check_rank_limits
from rerank.bench import make_rank_bodies
from rerank.catalogue import Catalogue
from rerank.experiments import Variant, assign_variant


def _fields(err: ValidationError) -> set[str]:
    return {str(part) for e in err.errors() for part in e["loc"]}


def test_rank_request_defaults_and_id_normalisation():
    req = RankRequest.model_validate({"user_id": 7, "candidates": [1, "2", "x"]})
    assert req.user_id == "7" and req.candidates == ["1", "2", "x"]
    assert req.k == 20 and req.rules.diversity == 0.0 and req.rules.exclude_purchased is True
    assert RankRequest(user_id="u").candidates is None  # whole catalogue


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "u", "candidates": []}, "candidates"),
        ({"user_id": "u", "candidates": ["a", "a"]}, "candidates"),
        ({"user_id": "u", "candidates": [1, "1"]}, "candidates"),  # the same id twice
        ({"user_id": "u", "candidates": [True]}, "candidates"),
        ({"user_id": "u", "candidates": [1.5]}, "candidates"),
        ({"user_id": "u", "k": 0}, "k"),
        ({"user_id": "u", "k": 5000}, "k"),
        ({"user_id": "", "k": 3}, "user_id"),
        ({"user_id": "u", "colour": "red"}, "colour"),
        ({"user_id": "u", "rules": {"diversity": -0.1}}, "diversity"),
        ({"user_id": "u", "rules": {"boost": {"a": "lots"}}}, "boost"),
        ({"user_id": "u", "rules": {"unknown_rule": 1}}, "unknown_rule"),
    ],
)
def test_rank_request_rejects_bad_input_naming_the_field(body, field):
    with pytest.raises(ValidationError) as info:
        RankRequest.model_validate(body)
    assert field in _fields(info.value)


def test_candidate_limit_names_the_field():
    check_rank_limits(RankRequest(user_id="u", candidates=["a", "b"]), max_candidates=2)
    check_rank_limits(RankRequest(user_id="u"), max_candidates=2)  # whole catalogue: no limit
    with pytest.raises(RequestLimitError) as info:
        check_rank_limits(RankRequest(user_id="u", candidates=["a", "b", "c"]), max_candidates=2)
    assert info.value.field == "candidates" and "at most 2" in info.value.message


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"user_id": "u", "item_id": "i", "type": "like"}, "type"),
        ({"user_id": "u", "item_id": "i"}, "type"),
        ({"user_id": "u", "type": "view"}, "item_id"),
        ({"user_id": "u", "item_id": "i", "type": "view", "ts": -1}, "ts"),
        ({"user_id": "u", "item_id": "i", "type": "view", "event_id": ""}, "event_id"),
        ({"user_id": "u", "item_id": "i", "type": "view", "extra": 1}, "extra"),
    ],
)
def test_events_request_rejects_bad_events(event, field):
    with pytest.raises(ValidationError) as info:
        EventsRequest.model_validate({"events": [event]})
    assert field in _fields(info.value)


def test_events_request_needs_events():
    with pytest.raises(ValidationError) as info:
        EventsRequest.model_validate({"events": []})
    assert "events" in _fields(info.value)
    ok = EventsRequest.model_validate({"events": [{"user_id": 1, "item_id": 2, "type": "purchase", "ts": 10}]})
    assert ok.events[0].user_id == "1" and ok.events[0].ts == 10.0


def test_variant_assignment_is_stable_and_follows_weights():
    variants = [Variant("a", 3.0), Variant("b", 1.0, diversity=0.3)]
    first = [assign_variant(f"user{i}", variants).name for i in range(4000)]
    assert first == [assign_variant(f"user{i}", variants).name for i in range(4000)]
    share_a = first.count("a") / len(first)
    assert 0.70 < share_a < 0.80  # weight 3:1
    with pytest.raises(ValueError):
        assign_variant("u", [])


def test_rank_bodies_are_valid_requests():
    bodies = make_rank_bodies(["u1", "u2"], [f"i{i}" for i in range(50)], n_candidates=20, k=5, n_bodies=8)
    assert len(bodies) == 8
    for raw in bodies:
        req = RankRequest.model_validate(json.loads(raw))
        assert len(req.candidates) == 20 and req.k == 5


def test_catalogue_maps_ids_and_attributes():
    ids = np.array(["", "a", "b", "c"], dtype=object)
    attrs = np.array([[0, 0], [1, 2], [3, 0], [0, 0]], dtype=np.int32)
    cat = Catalogue(ids, attrs)
    assert cat.n_items == 3
    assert cat.index(["b", "zzz", "a"]).tolist() == [2, 0, 1]
    assert cat.attributes_of(np.array([1, 0, 9])).tolist() == [[1, 2], [0, 0], [0, 0]]
    all_ids, all_idx = cat.all_items()
    assert all_ids == ["a", "b", "c"] and all_idx.tolist() == [1, 2, 3]

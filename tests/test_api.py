"""The HTTP models (rerank.serving.api) and the serving helpers without Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from rerank.serving.api import (
    DEFAULT_MAX_CATALOGUE_ITEMS,
    MAX_ABS_BOOST,
    MAX_BODY_BYTES,
    MAX_BOOST_ENTRIES,
    MAX_CONTEXT_BYTES,
    MAX_CONTEXT_KEYS,
    MAX_EXCLUDE,
    EventsRequest,
    RankRequest,
    RequestLimitError,
    RollbackRequest,
    check_body_size,
    check_rank_limits,
)
from rerank.clients.bench import make_rank_bodies
from rerank.serving.catalogue import Catalogue


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
        ({"user_id": "u", "rules": {"boost": {"a": float("nan")}}}, "boost"),
        ({"user_id": "u", "rules": {"diversity": float("nan")}}, "diversity"),
        ({"user_id": "u", "context": {"x": float("inf")}}, "context"),
        ({"user_id": "u", "context": {"x": [1]}}, "context"),
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


# ---------------------------------------------------------------- non-finite numbers and bounds
def _errors(err: ValidationError) -> list[tuple[tuple, str]]:
    return [(tuple(str(p) for p in e["loc"]), e["msg"]) for e in err.errors()]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e309", "-1e309"])
@pytest.mark.parametrize(
    ("template", "loc"),
    [
        ('{"user_id": "u", "rules": {"boost": {"a": %s}}}', ("rules", "boost", "a")),
        ('{"user_id": "u", "rules": {"diversity": %s}}', ("rules", "diversity")),
        ('{"user_id": "u", "context": {"x": %s}}', ("context", "x")),
    ],
)
@pytest.mark.parametrize("parse", ["python-json", "pydantic-json"])
def test_non_finite_numbers_in_rank_requests_are_refused_naming_the_field(literal, template, loc, parse):
    body = template % literal
    with pytest.raises(ValidationError) as info:
        if parse == "python-json":  # what FastAPI does: json.loads accepts NaN and turns 1e309 into inf
            RankRequest.model_validate(json.loads(body))
        else:
            RankRequest.model_validate_json(body)
    errors = _errors(info.value)
    assert len(errors) == 1 and errors[0][0] == loc, errors
    assert "finite" in errors[0][1]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e309"])
def test_non_finite_event_ts_is_refused(literal):
    body = '{"events": [{"user_id": "u", "item_id": "i", "type": "view", "ts": %s}]}' % literal
    with pytest.raises(ValidationError) as info:
        EventsRequest.model_validate(json.loads(body))
    assert _errors(info.value) == [(("events", "0", "ts"), "Input should be a finite number")]


def test_every_request_model_refuses_non_finite_numbers():
    for model in (RankRequest, EventsRequest, RollbackRequest):
        assert model.model_config.get("allow_inf_nan") is False, model.__name__


def test_boost_bounds():
    ok = RankRequest.model_validate({"user_id": "u", "rules": {"boost": {"a": MAX_ABS_BOOST, "b": -MAX_ABS_BOOST}}})
    assert ok.rules.boost == {"a": 1000.0, "b": -1000.0}
    for value in (MAX_ABS_BOOST * 1.001, -1e308):
        with pytest.raises(ValidationError) as info:
            RankRequest.model_validate({"user_id": "u", "rules": {"boost": {"a": value}}})
        [(loc, msg)] = _errors(info.value)
        assert loc == ("rules", "boost", "a") and "between -1000 and 1000" in msg and "pins" in msg
    many = {f"i{n}": 1.0 for n in range(MAX_BOOST_ENTRIES + 1)}
    with pytest.raises(ValidationError) as info:
        RankRequest.model_validate({"user_id": "u", "rules": {"boost": many}})
    [(loc, msg)] = _errors(info.value)
    assert loc == ("rules", "boost") and f"at most {MAX_BOOST_ENTRIES}" in msg
    many.popitem()
    assert len(RankRequest.model_validate({"user_id": "u", "rules": {"boost": many}}).rules.boost) == MAX_BOOST_ENTRIES


def test_exclude_bound():
    ids = [f"i{n}" for n in range(MAX_EXCLUDE)]
    assert len(RankRequest.model_validate({"user_id": "u", "rules": {"exclude": ids}}).rules.exclude) == MAX_EXCLUDE
    with pytest.raises(ValidationError) as info:
        RankRequest.model_validate({"user_id": "u", "rules": {"exclude": ids + ["one-more"]}})
    [(loc, msg)] = _errors(info.value)
    assert loc == ("rules", "exclude") and f"at most {MAX_EXCLUDE}" in msg


def test_context_accepts_json_scalars_only():
    ctx = {"page": "home", "slot": 3, "ratio": 0.5, "mobile": True, "ref": None}
    assert RankRequest.model_validate({"user_id": "u", "context": ctx}).context == ctx
    for value, kind in (([1, 2], "an array"), ({"a": 1}, "an object")):
        with pytest.raises(ValidationError) as info:
            RankRequest.model_validate({"user_id": "u", "context": {"x": value}})
        [(loc, msg)] = _errors(info.value)
        assert loc == ("context", "x") and "JSON scalars" in msg and kind in msg


def test_context_bounds():
    keys = {f"k{n}": n for n in range(MAX_CONTEXT_KEYS)}
    assert len(RankRequest.model_validate({"user_id": "u", "context": keys}).context) == MAX_CONTEXT_KEYS
    with pytest.raises(ValidationError) as info:
        RankRequest.model_validate({"user_id": "u", "context": {**keys, "extra": 1}})
    assert _errors(info.value)[0][0] == ("context",) and f"at most {MAX_CONTEXT_KEYS}" in _errors(info.value)[0][1]
    with pytest.raises(ValidationError) as info:  # few keys, but too many bytes
        RankRequest.model_validate({"user_id": "u", "context": {"blob": "x" * MAX_CONTEXT_BYTES}})
    [(loc, msg)] = _errors(info.value)
    assert loc == ("context",) and f"at most {MAX_CONTEXT_BYTES} allowed" in msg
    with pytest.raises(ValidationError) as info:
        RankRequest.model_validate({"user_id": "u", "context": {"k" * 65: 1}})
    assert _errors(info.value)[0][0][:1] == ("context",)


def test_whole_catalogue_ranking_is_capped():
    whole = RankRequest(user_id="u")
    check_rank_limits(whole, max_candidates=10, catalogue_size=DEFAULT_MAX_CATALOGUE_ITEMS)
    check_rank_limits(whole, max_candidates=10, catalogue_size=500, max_catalogue=500)
    check_rank_limits(whole, max_candidates=10, catalogue_size=10**7, max_catalogue=None)  # cap off
    with pytest.raises(RequestLimitError) as info:
        check_rank_limits(whole, max_candidates=10, catalogue_size=DEFAULT_MAX_CATALOGUE_ITEMS + 1)
    assert info.value.field == "candidates"
    assert f"limited to {DEFAULT_MAX_CATALOGUE_ITEMS}" in info.value.message and "send candidates" in info.value.message
    with pytest.raises(RequestLimitError) as info:
        check_rank_limits(whole, max_candidates=10, catalogue_size=501, max_catalogue=500)
    assert "501 items" in info.value.message and "at most 10" in info.value.message
    # an explicit candidate list is bounded by max_candidates only, whatever the catalogue size
    check_rank_limits(RankRequest(user_id="u", candidates=["a"]), max_candidates=10, catalogue_size=10**7,
                      max_catalogue=5)


def test_body_size_limit():
    assert MAX_BODY_BYTES == 1024 * 1024
    check_body_size(MAX_BODY_BYTES)
    with pytest.raises(RequestLimitError) as info:
        check_body_size(MAX_BODY_BYTES + 1)
    assert info.value.field == "body" and f"at most {MAX_BODY_BYTES}" in info.value.message
    with pytest.raises(RequestLimitError):
        check_body_size(11, max_bytes=10)
    # the largest valid /rank body under the default limits (ASCII ids) fits
    def ids(prefix: str, n: int = 1000) -> list[str]:
        return [prefix + str(i).rjust(255, "x") for i in range(n)]

    body = json.dumps({"user_id": "u" * 256, "candidates": ids("c"), "k": 1000,
                       "rules": {"exclude": ids("e", MAX_EXCLUDE), "diversity": 0.5,
                                 "boost": {i: -999.123456789 for i in ids("b", MAX_BOOST_ENTRIES)}},
                       "context": {f"k{n}": "v" for n in range(MAX_CONTEXT_KEYS)}})
    assert len(RankRequest.model_validate_json(body).candidates) == 1000
    assert len(body.encode()) < MAX_BODY_BYTES

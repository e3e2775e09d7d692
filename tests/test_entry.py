"""The event-stream entry (rerank.store.entry), the named KEYS / ARGV of the store's scripts
(rerank.store.lua) and the binary layouts (rerank.store.layout): one definition each, and the
writer and the readers agree on it."""

from __future__ import annotations

import re

import numpy as np
import pytest
import redis

from rerank.eventlog.records import event_row
from rerank.store import entry
from rerank.store.capacity import ITEM_FLOOR
from rerank.store.entry import EventEntry, entry_number, parse_seq
from rerank.store.events import WRITE_ARGS, WRITE_EVENT, WRITE_KEYS, Event
from rerank.store.feature_store import FeatureStore
from rerank.store.layout import _check
from rerank.store.lua import LuaScript


def test_the_script_writes_the_entry_fields_in_their_order(redis_url):
    store = FeatureStore(redis_url)
    extra = {"request_id": "r1", "position": "2", "experiment": "x", "arm": "a", "team": "", "attributed": "window",
             "value": "3.5"}
    assert tuple(extra) == entry.ATTRIBUTION_FIELDS
    store.write_events([Event("u", "i1", "view", ts=10.0), Event("u", "i2", "purchase", ts=11.0, extra=extra)])
    (_, first), (_, second) = redis.Redis.from_url(redis_url, decode_responses=True).xrange(store.keys.events)
    assert tuple(first) == entry.EVENT_FIELDS + (entry.NUMBER,)
    assert tuple(second) == entry.FIELDS
    e = EventEntry.from_fields(second)
    assert (e.user_id, e.item_id, e.item_idx, e.type, e.ts, e.seq, e.n) == ("u", "i2", 2, "purchase", 11.0, "1:1", 2)
    assert (e.request_id, e.position, e.arm, e.attributed, e.value) == ("r1", 2, "a", "window", 3.5)
    idx, types = parse_seq(e.seq)
    assert idx.tolist() == [1] and types.tolist() == [1]


def test_from_fields_types_and_names_the_bad_field():
    fields = {"event_id": "e", "user_id": "u", "item_id": "i", "item_idx": "7", "type": "click", "ts": "1.5"}
    e = EventEntry.from_fields(fields)  # an entry from before attribution and numbering
    assert (e.item_idx, e.ts, e.seq, e.request_id, e.position, e.value, e.n) == (7, 1.5, "", None, None, None, None)
    assert (e.experiment, e.arm, e.team, e.attributed) == ("", "", "", "")
    with pytest.raises(ValueError, match="field 'item_idx' or 'position': not an integer"):
        EventEntry.from_fields({**fields, "item_idx": "x"})
    with pytest.raises(ValueError, match="field 'item_idx' or 'position': not an integer"):
        EventEntry.from_fields({**fields, "position": "first"})
    with pytest.raises(ValueError, match="field 'user_id' missing"):
        EventEntry.from_fields({k: v for k, v in fields.items() if k != "user_id"})
    with pytest.raises(ValueError, match="field 'ts': not a number: 'soon'"):
        EventEntry.from_fields({**fields, "ts": "soon"})
    assert EventEntry.from_fields({**fields, "seq": "not checked here"}).seq == "not checked here"
    with pytest.raises(ValueError, match="field 'ts' missing"):
        EventEntry.from_fields({k: v for k, v in fields.items() if k != "ts"})
    row = event_row("1700000000000-0", fields)
    assert (row["item_idx"], row["ts"], row["position"], row["day"]) == (7, 1.5, None, "2023-11-14")


def test_entry_number_is_none_without_a_number():
    assert entry_number({"n": "41"}) == 41
    assert entry_number({}) is None and entry_number({"n": "x"}) is None


def test_parse_seq():
    seq, types = parse_seq("12:1 40:4 7:purchase")
    assert seq.tolist() == [12, 40, 7] and types.tolist() == [1, 4, 4]
    assert seq.dtype == np.int64 and types.dtype == np.int64
    assert parse_seq("3,5:view 9")[0].tolist() == [3, 5, 9] and parse_seq("3,5:view 9")[1].tolist() == [4, 1, 4]
    assert parse_seq("")[0].tolist() == [] and parse_seq("")[1].dtype == np.int64
    with pytest.raises(ValueError, match="'x1'"):
        parse_seq("x1")
    with pytest.raises(ValueError, match="unknown event type 'like'"):
        parse_seq("1:like")


def test_the_event_script_reads_its_keys_and_args_by_name():
    text = WRITE_EVENT.text
    assert "KEYS." not in text and "ARGV." not in text and "$" not in text
    assert f"redis.call('XADD', KEYS[{WRITE_KEYS.index('stream') + 1}], 'MAXLEN', '~', " \
           f"ARGV[{WRITE_ARGS.index('stream_maxlen') + 1}]" in text
    assert f"for i = {len(WRITE_ARGS) + 1}, #ARGV do" in text
    (line,) = [x for x in text.splitlines() if x.startswith("local entry = {")]
    assert tuple(re.findall(r"'([a-z_]+)', ", line)) == entry.EVENT_FIELDS
    assert f"entry[#entry + 1] = '{entry.NUMBER}'" in text
    assert ITEM_FLOOR.text.count("KEYS[1]") == 2 and "ARGV[1]" in ITEM_FLOOR.text


def test_bind_refuses_missing_and_unknown_names():
    script = LuaScript.render("return {KEYS.a, KEYS.b, ARGV.x}", keys=("a", "b"), args=("x",))
    assert script.text == "return {KEYS[1], KEYS[2], ARGV[1]}"
    assert script.bind({"b": "kb", "a": "ka"}, {"x": 1}) == (["ka", "kb"], [1])
    with pytest.raises(ValueError, match=r"KEYS: missing \['b'\], unknown \[\]"):
        script.bind({"a": "ka"}, {"x": 1})
    with pytest.raises(ValueError, match=r"ARGV: missing \[\], unknown \['y'\]"):
        script.bind({"a": "ka", "b": "kb"}, {"x": 1, "y": 2})
    with pytest.raises(ValueError, match="KEYS.c: not a declared name"):
        LuaScript.render("return KEYS.c", keys=("a",), args=())
    with pytest.raises(ValueError, match=r"ARGV: declared but never used by the script: \['y'\]"):
        LuaScript.render("return ARGV.x", keys=(), args=("x", "y"))
    with pytest.raises(KeyError):
        LuaScript.render("return '$MISSING'", keys=(), args=())


def test_the_layouts_match_their_lua_structs():
    with pytest.raises(AssertionError, match="does not match"):
        _check("<ibd", np.dtype([("idx", "<i4"), ("type", "<i4"), ("ts", "<f8")]))

"""benchmarks/floods.py at scale 0.001: Redis state and the online trainer stay within their caps."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def floods():
    spec = importlib.util.spec_from_file_location("rerank_bench_floods", REPO_ROOT / "benchmarks" / "floods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(floods):
    return floods.run(scale=0.001, progress=False)


def _within_maxlen(xlen: int, maxlen: int) -> bool:
    return xlen <= maxlen * 1.1 + 100  # MAXLEN ~ trims whole stream nodes (100 entries)


def test_new_items_stop_at_the_allowance_and_the_trainer_stays_within_it(results):
    r = results["new_items"]
    assert r["events"] == 1000 and r["stopped_by_oom"] is None
    assert r["items_admitted"] == r["allowance"] == 50
    assert r["events_refused_item"] == r["events"] - r["allowance"]
    assert r["next_item_idx"] == r["item_capacity"] and r["new_item_room"] == 0
    assert all(c["hlen"] == r["allowance"] for c in r["catalogue"].values())
    t = r["trainer"]
    assert min(r["xlen"], results["sizes"]["train_entries"]) <= t["entries_read"] <= r["xlen"]  # whole reads
    assert t["stats"]["events_invalid"] == t["entries_read"] - r["allowance"]  # the oldest events were admitted
    # it grows up to the newest admitted item it trained on; that item's one event can be among the
    # 1 in 10 held out (a secret-salted choice), so up to the capacity, not always exactly it
    assert r["model_items"] < t["n_items"] <= r["item_capacity"] and t["n_items_within_capacity"]
    assert t["table_rows"] <= 2 * (r["item_capacity"] + 1)  # ensure_capacity doubles the table


def test_anonymous_events_leave_no_markers_and_capped_state(results):
    r = results["anonymous_events"]
    assert r["events"] == 10_000 and r["stopped_by_oom"] is None
    assert r["evt_keys"] == 0
    assert _within_maxlen(r["xlen"], r["stream_maxlen"])
    assert all(_within_maxlen(p["xlen"], r["stream_maxlen"]) for p in r["curve"])
    assert r["user_seq_len_max"] <= r["max_history"]
    assert r["user_seq_keys"] <= r["users"] + 1  # + the warm-up user
    # nothing else: item_idx, item_id, item_stats, next_item_idx, the stream and its entry counter,
    # and (while it lives, 2 minutes) the counter of new items admitted this minute
    assert r["dbsize"] - (r["user_seq_keys"] + r["bought_sets"] + 6) in (0, 1)


def test_impressions_are_capped_per_stream_and_per_user(results):
    r = results["impressions"]
    assert r["events"] == 1000 and r["stopped_by_oom"] is None
    assert _within_maxlen(r["xlen"], r["impressions_maxlen"])
    assert r["user_list_len_max"] <= r["recent_per_user"]
    assert r["imp_hash_ttl_s"] <= r["window_s"]

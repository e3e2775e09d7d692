"""The embedded Redis' maxmemory follows the app's bounds; a plan the machine cannot hold is refused."""

from __future__ import annotations

import pytest

from deployments.app import AppArgs, embedded_maxmemory_of
from rerank.store.capacity import MemoryPlanError

GIB = 2**30


def _args(**over) -> AppArgs:
    return AppArgs.model_validate({"allow_no_auth": True, "model": "m", "online": {"enabled": False}, **over})


def test_the_default_bounds_fit_the_default_two_gigabytes():
    assert embedded_maxmemory_of(_args(), machine_bytes=24 * GIB) == 2 * GIB


def test_a_longer_idempotency_ttl_grows_maxmemory_with_it():
    week = embedded_maxmemory_of(_args(event_ttl_s=7 * 86400), machine_bytes=64 * GIB)
    day = embedded_maxmemory_of(_args(event_ttl_s=86400), machine_bytes=64 * GIB)
    assert 2 * GIB < day < week  # 200 events/s x 125 B x the TTL, with headroom


def test_a_plan_over_half_the_machine_is_refused_naming_its_parts():
    with pytest.raises(MemoryPlanError, match="idempotency markers"):
        embedded_maxmemory_of(_args(event_ttl_s=7 * 86400), machine_bytes=8 * GIB)

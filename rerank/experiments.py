"""Experiment variants: a stable assignment of users to weighted buckets.

A variant may carry default ranking rules (today: the MMR diversity) that apply
when the request does not set them itself; the response names the variant so
outcomes can be attributed in A/B analysis.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float = 1.0
    diversity: float | None = None  # default MMR trade-off for this bucket (None = keep the request's)


def assign_variant(user_id: str, variants: list[Variant], salt: str = "rerank") -> Variant:
    """The same user always lands in the same variant (hash of salt+user_id), by weight."""
    if not variants:
        raise ValueError("assign_variant needs at least one variant")
    total = sum(v.weight for v in variants)
    if total <= 0:
        raise ValueError("variant weights must sum to a positive number")
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2**64 * total
    for variant in variants:
        point -= variant.weight
        if point < 0:
            return variant
    return variants[-1]

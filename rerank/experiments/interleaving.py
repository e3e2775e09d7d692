"""Team-draft interleaving (Radlinski, Kurup, Joachims 2008, "How does clickthrough data reflect
retrieval quality?").

Two rankers' lists are merged into one: the team with fewer picks so far picks next (a coin flip
when both have picked as many), taking its highest-ranked item not already shown. Each shown item
remembers its team; a click credits that team, and the team with more credited clicks wins the
impression. Seed the coin per request (`request_rng(request_id)`) so a list can be rebuilt.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

import numpy as np


def request_rng(request_id: str) -> random.Random:
    """A coin seeded from the request id: the same request always interleaves the same way."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def team_draft(a: Sequence[str], b: Sequence[str], k: int, rng: random.Random | np.random.Generator,
               names: tuple[str, str] = ("a", "b")) -> list[tuple[str, str]]:
    """The first k (item_id, team) of the team-draft merge of rankings a and b, in position order.

    When one list runs out of unused items the other continues alone; the merge stops at k items
    or when both are exhausted. An item already shown (picked by either team) is skipped.
    """
    lists = (a, b)
    cursor = [0, 0]  # next unread rank in each list
    picks = [0, 0]
    merged: list[tuple[str, str]] = []
    shown: set[str] = set()

    def has_unused(team: int) -> bool:
        ranking = lists[team]
        while cursor[team] < len(ranking) and ranking[cursor[team]] in shown:
            cursor[team] += 1
        return cursor[team] < len(ranking)

    while len(merged) < k:
        available = [team for team in (0, 1) if has_unused(team)]
        if not available:
            break
        if len(available) == 1:
            team = available[0]
        elif picks[0] != picks[1]:
            team = 0 if picks[0] < picks[1] else 1
        else:
            team = 0 if rng.random() < 0.5 else 1
        item = lists[team][cursor[team]]
        shown.add(item)
        picks[team] += 1
        merged.append((item, names[team]))
    return merged


def credit(teams: Sequence[str], clicked_positions: Sequence[int]) -> dict[str, int]:
    """Clicks credited to each team. teams[i] is the team of position i + 1; each clicked position
    counts once, and positions outside the list (a stale client) are ignored."""
    counts = {team: 0 for team in teams}
    for position in set(clicked_positions):
        if 1 <= position <= len(teams):
            counts[teams[position - 1]] += 1
    return counts


def winner(credit: dict[str, int], names: tuple[str, str]) -> str | None:
    """The team with more credited clicks; None on a tie (including no clicks)."""
    first, second = (credit.get(name, 0) for name in names)
    if first == second:
        return None
    return names[0] if first > second else names[1]

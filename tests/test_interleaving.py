"""Team-draft interleaving: the merge's invariants, credit and winner."""

from __future__ import annotations

import random

import numpy as np
import pytest

from rerank.experiments.interleaving import credit, request_rng, team_draft, winner


def random_lists(rng: random.Random) -> tuple[list[str], list[str]]:
    pool = [f"i{j}" for j in range(30)]
    return rng.sample(pool, rng.randint(0, 15)), rng.sample(pool, rng.randint(0, 15))


@pytest.mark.parametrize("seed", range(200))
def test_merge_invariants(seed):
    rng = random.Random(seed)
    a, b = random_lists(rng)
    k = rng.randint(0, 25)
    merged = team_draft(a, b, k, rng, names=("A", "B"))
    items = [item for item, _ in merged]

    assert len(items) == len(set(items))
    assert len(merged) == min(k, len(set(a) | set(b)))
    for team, ranking in (("A", a), ("B", b)):
        picked = [item for item, t in merged if t == team]
        assert picked == [item for item in ranking if item in picked]  # in the team's own rank order
    for n in range(1, len(merged) + 1):
        prefix = [t for _, t in merged[:n]]
        shown = {item for item, _ in merged[:n]}
        both_had_items = set(a) - shown and set(b) - shown
        if both_had_items:
            assert abs(prefix.count("A") - prefix.count("B")) <= 1


def test_each_pick_is_the_teams_best_unused_item():
    a, b = ["x", "y", "z"], ["y", "w", "x"]
    for seed in range(50):
        merged = team_draft(a, b, 4, random.Random(seed))
        shown: list[str] = []
        for item, team in merged:
            ranking = a if team == "a" else b
            assert item == next(i for i in ranking if i not in shown)
            shown.append(item)


def test_identical_lists_keep_their_order():
    ranking = [f"i{j}" for j in range(10)]
    for seed in range(20):
        assert [item for item, _ in team_draft(ranking, ranking, 10, random.Random(seed))] == ranking


def test_exhausted_list_lets_the_other_continue():
    merged = team_draft(["a1"], ["b1", "b2", "b3"], 10, random.Random(0), names=("A", "B"))
    assert sorted(merged) == [("a1", "A"), ("b1", "B"), ("b2", "B"), ("b3", "B")]
    assert team_draft([], [], 5, random.Random(0)) == []


def test_numpy_generator_and_request_seed_reproduce_the_list():
    a, b = [f"a{j}" for j in range(10)], [f"b{j}" for j in range(10)]
    assert team_draft(a, b, 10, np.random.default_rng(7)) == team_draft(a, b, 10, np.random.default_rng(7))
    assert team_draft(a, b, 10, request_rng("req-1")) == team_draft(a, b, 10, request_rng("req-1"))
    teams = {tuple(t for _, t in team_draft(a, b, 10, request_rng(f"req-{j}"))) for j in range(50)}
    assert len(teams) > 1  # different requests flip different coins


def test_each_team_leads_position_one_half_the_time():
    a, b = ["a1", "a2"], ["b1", "b2"]
    first = [team_draft(a, b, 2, request_rng(f"r{j}"))[0][1] for j in range(4000)]
    share = first.count("a") / len(first)
    assert abs(share - 0.5) < 4 * 0.5 / np.sqrt(len(first))


def test_credit_goes_to_the_team_that_contributed_the_clicked_item():
    merged = team_draft(["x", "y", "z"], ["u", "v", "w"], 6, random.Random(3), names=("A", "B"))
    teams = [team for _, team in merged]
    for position in range(1, 7):
        assert credit(teams, [position]) == {"A": int(teams[position - 1] == "A"), "B": int(teams[position - 1] == "B")}


def test_credit_counts_positions_once_and_ignores_unknown_ones():
    teams = ["A", "B", "A", "B"]
    assert credit(teams, [1, 1, 3, 2, 9, 0]) == {"A": 2, "B": 1}
    assert credit(teams, []) == {"A": 0, "B": 0}


def test_winner_and_ties():
    assert winner({"A": 2, "B": 1}, ("A", "B")) == "A"
    assert winner({"A": 0, "B": 1}, ("A", "B")) == "B"
    assert winner({"A": 1, "B": 1}, ("A", "B")) is None
    assert winner({}, ("A", "B")) is None

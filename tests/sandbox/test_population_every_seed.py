"""Sandbox populations build for every seed and size (issue 13, item 10).

``--seed 3 --patients 3000`` once crashed the builder: a twin of a person whose sex is neither
female nor male, who drew a name from the other sex's list, was given "the next name" looked up in
the wrong list. The sweep builds many small worlds (a couple of days each, so it stays fast); the
reported case is built as reported; the renaming rule is checked for every name and sex.
"""

import random
from datetime import date

import pytest

from sandbox.population import PopulationConfig, build
from sandbox.population.people import _next_name
from sandbox.population.pools import FEMALE, MALE

SEXES = ("female", "male", "other", "unknown")
START, END = date(2026, 11, 20), date(2026, 11, 21)


def test_the_reported_seed_and_size_builds() -> None:
    world = build(PopulationConfig(seed=3, patients=3000, start=START, end=date(2026, 11, 27)))
    assert len(world.persons) == 3000
    twins = [members for members in world.groups.values() if world.persons[members[0]].hard_group == "twin"]
    assert twins
    for members in twins:
        names = [world.persons[pid].given_name for pid in members]
        assert len(set(names)) == len(names), "twins must not share a given name"


@pytest.mark.parametrize("sweep", range(4))
def test_many_seeds_and_sizes_build(sweep: int) -> None:
    draw = random.Random(sweep)
    for _ in range(15):
        seed, patients = draw.randrange(10_000), draw.choice((1, 2, 3, 7, 40, draw.randrange(1, 600)))
        world = build(PopulationConfig(seed=seed, patients=patients, start=START, end=END))
        assert len(world.persons) == patients, (seed, patients)


@pytest.mark.parametrize("sex", SEXES)
def test_a_twin_always_gets_another_name(sex: str) -> None:
    for name in {*FEMALE, *MALE, "Zz-not-in-any-list"}:
        other = _next_name(name, sex)
        assert other != name
        assert other in FEMALE or other in MALE

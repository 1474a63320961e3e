"""``verify --read-data-subset``: which packs' data a run reads (n/t groups, or a random share)."""

from __future__ import annotations

import os
import random

import pytest

from raksha.domain.data_subset import DataSubset
from raksha.domain.errors import InvalidInput


@pytest.mark.parametrize(("text", "groups", "group", "percent"), [
    ("1/7", 7, 0, 100.0), ("7/7", 7, 6, 100.0), (" 2/3 ", 3, 1, 100.0), ("1/1", 1, 0, 100.0),
    ("10%", 1, 0, 10.0), ("2.5%", 1, 0, 2.5), ("100%", 1, 0, 100.0),
])
def test_subsets_parse(text: str, groups: int, group: int, percent: float) -> None:
    subset = DataSubset.parse(text)
    assert (subset.groups, subset.group, subset.percent) == (groups, group, percent)
    assert subset.spec == text.strip()


@pytest.mark.parametrize("text", ["0/5", "6/5", "1/0", "0%", "101%", "-1%", "abc", "", "1/2/3", "1 / 2", "10"])
def test_anything_else_is_refused_with_a_stable_code(text: str) -> None:
    with pytest.raises(InvalidInput) as err:
        DataSubset.parse(text)
    assert err.value.code == "SUBSET_INVALID" and "1/7" in err.value.message


def test_the_groups_of_t_take_every_pack_exactly_once() -> None:
    packs = [os.urandom(32) for _ in range(500)]
    rng = random.Random(1)
    groups = [DataSubset.parse(f"{n}/5") for n in range(1, 6)]
    for pack in packs:
        assert sum(g.includes(pack, rng) for g in groups) == 1
    sizes = [sum(g.includes(p, rng) for p in packs) for g in groups]
    assert min(sizes) > 60 and DataSubset.parse("3/5").fraction == pytest.approx(0.2)  # ~100 each


def test_a_group_is_the_same_packs_every_run() -> None:
    packs = [os.urandom(32) for _ in range(50)]
    subset = DataSubset.parse("2/4")
    run1, run2 = random.Random(1), random.Random(2)
    assert [subset.includes(p, run1) for p in packs] == [subset.includes(p, run2) for p in packs]


def test_a_percentage_draws_that_share_anew_each_run() -> None:
    packs = [os.urandom(32) for _ in range(2000)]
    subset = DataSubset.parse("10%")
    run1, run2 = random.Random(1), random.Random(2)
    first = [subset.includes(p, run1) for p in packs]
    second = [subset.includes(p, run2) for p in packs]
    assert 120 < sum(first) < 280 and first != second
    assert all(DataSubset.parse("100%").includes(p, random.Random(3)) for p in packs[:50])

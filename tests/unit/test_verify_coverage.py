"""When a vault's recent verification passes have read every pack: the rule that makes a run ``ok``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from raksha.domain.verify_coverage import KEPT_PASSES, Coverage, VerifyPass, coverage, newest_first

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def passes(*subsets: str | None, damaged: dict[int, str] | None = None) -> list[VerifyPass]:
    """Daily passes, the first given the oldest; returned newest first as the service keeps them."""
    out = []
    for day, subset in enumerate(subsets):
        named = {f"job/run{day}/vm/vda": "chunk missing"} if (damaged or {}).get(day) else {}
        start = T0 + timedelta(days=day)
        out.append(VerifyPass(start, start + timedelta(minutes=5), subset, not named, named, {"packs_checked": 3}))
    return out[::-1]


def test_a_pass_of_every_pack_covers_alone() -> None:
    assert coverage(passes(None)) == Coverage(T0, frozenset())
    assert coverage(passes("1/1")) == Coverage(T0, frozenset())


def test_groups_cover_once_the_newest_of_each_is_there() -> None:
    assert coverage(passes("1/3", "2/3")) is None
    assert coverage(passes("1/3", "2/3", "3/3")) == Coverage(T0, frozenset())
    # A day later the window slides: 2/3, 3/3 and the new 1/3 began on day 1.
    assert coverage(passes("1/3", "2/3", "3/3", "1/3")) == Coverage(T0 + timedelta(days=1), frozenset())


def test_a_group_seen_twice_waits_for_the_missing_one() -> None:
    # A restart ran group 2 twice: 1 and 3 still needed before day 0's pass.
    assert coverage(passes("1/3", "2/3", "2/3", "3/3")) == Coverage(T0, frozenset())
    assert coverage(passes("2/3", "2/3", "3/3")) is None


def test_a_change_of_the_number_of_groups_starts_a_new_cycle() -> None:
    assert coverage(passes("1/2", "2/2", "1/3", "2/3")) is None
    assert coverage(passes("1/2", "2/2", "1/3", "2/3", "3/3")) == Coverage(T0 + timedelta(days=2), frozenset())


def test_random_subsets_neither_complete_nor_break_a_cycle_but_their_damage_counts() -> None:
    got = coverage(passes("1/2", "10%", "2/2", damaged={1: "x"}))
    assert got == Coverage(T0, frozenset({"job/run1/vm/vda"}))
    assert coverage(passes("10%", "50%")) is None


def test_the_damage_named_inside_the_window_counts_and_outside_it_does_not() -> None:
    window = passes("1/2", "2/2", "1/2", damaged={0: "x", 2: "y"})
    got = coverage(window)
    assert got is not None and got.since == T0 + timedelta(days=1)
    assert got.damaged_backups == {"job/run2/vm/vda"}  # day 0's pass is older than the window


def test_passes_round_trip_and_are_kept_newest_first_up_to_a_bound() -> None:
    (p,) = passes("3/7", damaged={0: "x"})
    assert VerifyPass.from_dict(p.to_dict()) == p
    kept = [q.to_dict() for q in passes(*["1/1"] * (KEPT_PASSES + 5))]
    new = passes("1/1")[0]
    out = newest_first(new, kept)
    assert len(out) == KEPT_PASSES and out[0] == new and out[1] == VerifyPass.from_dict(kept[0])
    assert newest_first(new, None) == [new]
    assert newest_first(new, [{"started_at": "yesterday"}, "junk", kept[0]]) == [new, VerifyPass.from_dict(kept[0])]

"""Retention policy examples (restic ``forget`` semantics)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from raksha.domain.errors import InvalidInput
from raksha.domain.retention import RetentionPolicy, Snapshot, apply

START = datetime(2026, 11, 1, tzinfo=UTC)


def snap(created: datetime, group: str = "job1/vm1/vda") -> Snapshot:
    return Snapshot(id=created.strftime("%Y%m%dT%H%M") + "-" + group, created=created, group=group)


def four_a_day(days: int, start: datetime = START, group: str = "job1/vm1/vda") -> list[Snapshot]:
    """Backups at 00:00, 06:00, 12:00 and 18:00 UTC for ``days`` days."""
    return [snap(start + timedelta(days=d, hours=h), group) for d in range(days) for h in (0, 6, 12, 18)]


def kept_times(policy: RetentionPolicy, snaps: list[Snapshot]) -> list[datetime]:
    return [s.created for s, _ in apply(policy, snaps).keep]


def test_keep_daily_7_over_30_days_of_4_backups_a_day_keeps_last_backup_of_each_of_last_7_days() -> None:
    snaps = four_a_day(30)
    result = apply(RetentionPolicy(keep_daily=7), snaps)
    assert [s.created for s, _ in result.keep] == [
        datetime(2026, 11, day, 18, tzinfo=UTC) for day in range(30, 23, -1)
    ]
    assert result.keep[0][1] == ["daily 2026-11-30"]
    assert len(result.forget) == 120 - 7


def test_keep_last_3_keeps_the_three_newest() -> None:
    snaps = four_a_day(2)
    result = apply(RetentionPolicy(keep_last=3), snaps)
    assert [s.created.hour for s, _ in result.keep] == [18, 12, 6]
    assert all(reasons == ["last"] for _, reasons in result.keep)
    assert len(result.forget) == 5


def test_keep_last_larger_than_history_keeps_everything() -> None:
    snaps = four_a_day(1)
    result = apply(RetentionPolicy(keep_last=100), snaps)
    assert len(result.keep) == 4 and result.forget == []


def test_gaps_do_not_shorten_history_buckets_count_only_days_with_backups() -> None:
    # Backups on Nov 1, 5 and 20 only: keep-daily 2 keeps Nov 20 and Nov 5, not "the last 2 calendar days".
    snaps = [snap(datetime(2026, 11, d, 3, tzinfo=UTC)) for d in (1, 5, 20)]
    assert [t.day for t in kept_times(RetentionPolicy(keep_daily=2), snaps)] == [20, 5]


def test_keep_hourly_uses_the_newest_snapshot_of_each_hour() -> None:
    base = datetime(2026, 11, 25, 10, tzinfo=UTC)
    snaps = [snap(base + timedelta(minutes=15 * i)) for i in range(12)]  # 10:00 .. 12:45
    result = apply(RetentionPolicy(keep_hourly=2), snaps)
    assert [(s.created.hour, s.created.minute) for s, _ in result.keep] == [(12, 45), (11, 45)]
    assert [r for _, r in result.keep] == [["hourly 2026-11-25 12"], ["hourly 2026-11-25 11"]]


def test_keep_weekly_buckets_by_iso_week() -> None:
    # 2026-12-28 (Mon) .. 2027-01-03 (Sun) is ISO week 2026-W53; 2027-01-04 starts 2027-W01.
    snaps = [snap(datetime(2026, 12, 20, tzinfo=UTC) + timedelta(days=d)) for d in range(20)]
    result = apply(RetentionPolicy(keep_weekly=3), snaps)
    assert [(s.created.date().isoformat(), r) for s, r in result.keep] == [
        ("2027-01-08", ["weekly 2027-W01"]),
        ("2027-01-03", ["weekly 2026-W53"]),
        ("2026-12-27", ["weekly 2026-W52"]),
    ]


def test_keep_monthly_and_yearly_over_three_years_of_daily_backups() -> None:
    snaps = [snap(datetime(2024, 1, 1, 2, tzinfo=UTC) + timedelta(days=d)) for d in range(3 * 365)]
    newest = snaps[-1].created  # 2026-12-30
    result = apply(RetentionPolicy(keep_monthly=3, keep_yearly=5), snaps)
    by_date = {s.created.date().isoformat(): r for s, r in result.keep}
    assert by_date == {
        newest.date().isoformat(): ["monthly 2026-12", "yearly 2026"],
        "2026-11-30": ["monthly 2026-11"],
        "2026-10-31": ["monthly 2026-10"],
        "2025-12-31": ["yearly 2025"],
        "2024-12-31": ["yearly 2024"],
    }


def test_a_snapshot_kept_by_several_rules_lists_every_reason() -> None:
    snaps = four_a_day(3)
    result = apply(RetentionPolicy(keep_last=1, keep_daily=1, keep_monthly=1), snaps)
    assert len(result.keep) == 1
    assert result.keep[0][1] == ["last", "daily 2026-11-03", "monthly 2026-11"]


def test_rules_combine_as_a_union() -> None:
    snaps = four_a_day(10)
    result = apply(RetentionPolicy(keep_last=2, keep_daily=3), snaps)
    assert [(s.created.day, s.created.hour) for s, _ in result.keep] == [(10, 18), (10, 12), (9, 18), (8, 18)]
    assert len(result.keep) + len(result.forget) == 40


def test_keep_within_is_relative_to_the_newest_snapshot_not_to_now() -> None:
    snaps = four_a_day(30)  # newest: Nov 30 18:00, long in the past is fine
    result = apply(RetentionPolicy(keep_within=timedelta(days=1)), snaps)
    assert [s.created for s, _ in result.keep] == [
        datetime(2026, 11, 30, 18, tzinfo=UTC),
        datetime(2026, 11, 30, 12, tzinfo=UTC),
        datetime(2026, 11, 30, 6, tzinfo=UTC),
        datetime(2026, 11, 30, 0, tzinfo=UTC),
        datetime(2026, 11, 29, 18, tzinfo=UTC),  # exactly one day older: the boundary is inclusive
    ]
    assert result.keep[0][1] == ["within 1 day, 0:00:00"]


def test_groups_are_independent() -> None:
    old_vm = [snap(datetime(2025, 3, d, tzinfo=UTC), "job1/vm-old/vda") for d in (1, 2, 3)]
    new_vm = four_a_day(2, group="job1/vm1/vda")
    result = apply(RetentionPolicy(keep_last=1), old_vm + new_vm)
    assert [(s.group, s.created) for s, _ in result.keep] == [
        ("job1/vm-old/vda", datetime(2025, 3, 3, tzinfo=UTC)),
        ("job1/vm1/vda", datetime(2026, 11, 2, 18, tzinfo=UTC)),
    ]
    assert len(result.forget) == 2 + 7


def test_every_snapshot_is_either_kept_or_forgotten_exactly_once_whatever_the_input_order() -> None:
    snaps = four_a_day(40) + four_a_day(5, group="job2/vm9/vdb")
    policy = RetentionPolicy(keep_last=2, keep_daily=5, keep_weekly=2, keep_within=timedelta(hours=30))
    expected = apply(policy, snaps)
    shuffled = snaps[:]
    random.Random(7).shuffle(shuffled)
    result = apply(policy, shuffled)
    assert result == expected
    ids = [s.id for s, _ in result.keep] + [s.id for s in result.forget]
    assert sorted(ids) == sorted(s.id for s in snaps)


def test_buckets_are_taken_in_utc_whatever_the_timestamps_zone() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    # 2026-11-26 01:00 in India is 2026-11-25 19:30 UTC: same UTC day as the other backup.
    late = Snapshot("b", datetime(2026, 11, 26, 1, 0, tzinfo=ist), "g")
    early = Snapshot("a", datetime(2026, 11, 25, 8, 0, tzinfo=UTC), "g")
    result = apply(RetentionPolicy(keep_daily=2), [early, late])
    assert [(s.id, r) for s, r in result.keep] == [("b", ["daily 2026-11-25"])]
    assert result.forget == [early]


def test_no_snapshots_gives_an_empty_result() -> None:
    result = apply(RetentionPolicy(keep_last=1), [])
    assert result.keep == [] and result.forget == []


def test_an_empty_policy_refuses_to_forget_everything() -> None:
    assert RetentionPolicy().is_empty()
    assert RetentionPolicy(keep_within=timedelta(0)).is_empty()
    with pytest.raises(InvalidInput) as exc:
        apply(RetentionPolicy(), four_a_day(1))
    assert exc.value.code == "RETENTION_EMPTY"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": -1},
        {"keep_daily": -7},
        {"keep_yearly": -1},
        {"keep_within": timedelta(seconds=-1)},
    ],
)
def test_negative_values_are_invalid(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInput) as exc:
        RetentionPolicy(**kwargs)  # type: ignore[arg-type]
    assert exc.value.code == "RETENTION_INVALID"


def test_a_naive_creation_time_is_refused() -> None:
    with pytest.raises(InvalidInput) as exc:
        Snapshot("x", datetime(2026, 11, 25), "g")
    assert exc.value.code == "RETENTION_INVALID"

"""Retention policy: which backups to keep and which to forget. Pure, no I/O.

The semantics follow restic's ``forget``: within each group (e.g.
``job/vm/disk``) snapshots are ordered newest first; ``keep_last`` keeps the N
newest; each bucket rule keeps the newest snapshot of each of the N most
recent distinct buckets (hours, days, ISO weeks, months, years) that have a
snapshot at all, so gaps in the schedule do not shorten the history kept;
``keep_within`` keeps everything created within that duration of the group's
newest snapshot. A snapshot kept by any rule is kept; the rest are forgotten.
All bucketing is done in UTC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta

from raksha.domain.errors import InvalidInput


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: timedelta | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "keep_within":
                if value is not None and (not isinstance(value, timedelta) or value < timedelta(0)):
                    raise InvalidInput(
                        f"keep_within must be a non-negative duration, not {value!r}",
                        code="RETENTION_INVALID",
                        field=f.name,
                    )
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(
                    f"{f.name} must be a non-negative integer, not {value!r}",
                    code="RETENTION_INVALID",
                    field=f.name,
                )

    def is_empty(self) -> bool:
        """True if the policy keeps nothing (a zero ``keep_within`` counts as unset)."""
        counts = (
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        )
        return not any(counts) and not self.keep_within


@dataclass(frozen=True)
class Snapshot:
    id: str
    created: datetime  # tz-aware; bucketed in UTC
    group: str

    def __post_init__(self) -> None:
        # A naive datetime would be bucketed in whatever zone the caller meant; refuse to guess.
        if self.created.tzinfo is None or self.created.utcoffset() is None:
            raise InvalidInput(
                f"snapshot {self.id!r} has a naive creation time {self.created.isoformat()}",
                code="RETENTION_INVALID",
                snapshot=self.id,
            )


@dataclass
class RetentionResult:
    keep: list[tuple[Snapshot, list[str]]] = field(default_factory=list)
    forget: list[Snapshot] = field(default_factory=list)


def _hour(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H")


def _day(t: datetime) -> str:
    return t.strftime("%Y-%m-%d")


def _week(t: datetime) -> str:
    year, week, _ = t.isocalendar()
    return f"{year:04d}-W{week:02d}"


def _month(t: datetime) -> str:
    return t.strftime("%Y-%m")


def _year(t: datetime) -> str:
    return f"{t.year:04d}"


_BUCKETS: tuple[tuple[str, str, Callable[[datetime], str]], ...] = (
    ("hourly", "keep_hourly", _hour),
    ("daily", "keep_daily", _day),
    ("weekly", "keep_weekly", _week),
    ("monthly", "keep_monthly", _month),
    ("yearly", "keep_yearly", _year),
)


def _apply_group(policy: RetentionPolicy, snaps: list[Snapshot], result: RetentionResult) -> None:
    # Newest first; the id breaks ties so the outcome does not depend on input order.
    snaps = sorted(snaps, key=lambda s: (s.created, s.id), reverse=True)
    reasons: list[list[str]] = [[] for _ in snaps]

    for i in range(min(policy.keep_last, len(snaps))):
        reasons[i].append("last")

    for name, attr, bucket_of in _BUCKETS:
        remaining: int = getattr(policy, attr)
        last_bucket: str | None = None
        for i, snap in enumerate(snaps):
            if remaining <= 0:
                break
            bucket = bucket_of(snap.created.astimezone(UTC))
            if bucket != last_bucket:
                # Newest first, so the first snapshot seen in a bucket is its newest.
                reasons[i].append(f"{name} {bucket}")
                last_bucket = bucket
                remaining -= 1

    if policy.keep_within and snaps:
        cutoff = snaps[0].created - policy.keep_within
        for i, snap in enumerate(snaps):
            if snap.created >= cutoff:
                reasons[i].append(f"within {policy.keep_within}")

    for snap, why in zip(snaps, reasons, strict=True):
        if why:
            result.keep.append((snap, why))
        else:
            result.forget.append(snap)


def apply(policy: RetentionPolicy, snapshots: Iterable[Snapshot]) -> RetentionResult:
    """Split ``snapshots`` into those ``policy`` keeps (with the reasons) and those to forget.

    Groups are independent. Results are grouped by group name, newest first within each.
    """
    if policy.is_empty():
        # An empty policy would forget everything; make that impossible to do by accident.
        raise InvalidInput(
            "the retention policy keeps nothing; refusing to forget every backup",
            code="RETENTION_EMPTY",
        )
    groups: dict[str, list[Snapshot]] = {}
    for snap in snapshots:
        groups.setdefault(snap.group, []).append(snap)
    result = RetentionResult()
    for group in sorted(groups):
        _apply_group(policy, groups[group], result)
    return result

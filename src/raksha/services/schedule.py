"""A job's schedule: when it fires next, and whether a run is full or incremental.

A schedule is an interval (the 2013 client's ``hours``) or a cron expression (UTC);
``full_every`` N makes every N-th run of the job full and the others incremental
(0: full only when there is nothing to build on).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from croniter import croniter

from raksha.domain.errors import InvalidInput


def next_fire(interval_seconds: int | None, cron: str | None, after: datetime) -> datetime | None:
    if interval_seconds:
        return after + timedelta(seconds=interval_seconds)
    if cron:
        nxt: datetime = croniter(cron, after).get_next(datetime)
        return nxt
    return None


def columns(sched: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The job columns for a schedule document (``{}`` or None clears the schedule)."""
    interval = sched.get("interval_hours")
    cron = sched.get("cron")
    if cron is not None and not croniter.is_valid(cron):
        raise InvalidInput(f"{cron!r} is not a cron expression (minute hour day month weekday)",
                           code="SCHEDULE_INVALID", field="schedule.cron")
    seconds = round(float(interval) * 3600) if interval else None
    enabled = bool(sched.get("enabled", True))
    return {
        "schedule_interval_seconds": seconds,
        "schedule_cron": cron,
        "schedule_enabled": enabled,
        "full_every": int(sched.get("full_every", 0)),
        "next_run_at": next_fire(seconds, cron, now) if enabled else None,
    }


def choose_type(kind: str, job: Any, has_parent: bool) -> str:
    """``full`` / ``incremental`` as asked; ``auto`` (run once, scheduled runs) follows the job's policy."""
    if kind in ("full", "incremental"):
        return kind
    if not has_parent:
        return "full"
    every = int(job.full_every or 0)
    if every and job.runs_started % every == 0:
        return "full"
    return "incremental"

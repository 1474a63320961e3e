"""Several schedulers on one database (several servers, or one restarted while the old one still ticks):
a due job gets exactly one run, and its next time is set once.

Every test runs on SQLite, and in the slow runs on real PostgreSQL and MariaDB too.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from raksha.db import Database
from raksha.db import api as db
from raksha.db.types import utcnow
from raksha.services.scheduler import Scheduler

P1, USER = "project-1", "user-1"


class Casts:
    """Stands for the transport: records what the scheduler casts to the orchestrator."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def cast(self, topic: str, method: str, **kwargs: Any) -> None:
        self.calls.append((topic, method, kwargs))


def test_schedulers_racing_start_one_run_of_a_due_job(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        job = db.create_job(s, P1, USER, name="due", vms=["vm"], schedule_interval_seconds=3600,
                            next_run_at=utcnow() - timedelta(seconds=1))
    transports = [Casts() for _ in range(4)]
    schedulers = [Scheduler(raksha_db, t) for t in transports]  # type: ignore[arg-type]
    barrier = threading.Barrier(len(schedulers))
    started: list[list[str]] = []

    def fire(scheduler: Scheduler) -> None:
        barrier.wait()
        started.append(scheduler.fire_due())

    threads = [threading.Thread(target=fire, args=(sch,)) for sch in schedulers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(len(ids) for ids in started) == [0, 0, 0, 1], started
    with raksha_db.begin() as s:
        runs = db.list_runs(s, P1, job_id=job.id)
        again = db.get_job(s, P1, job.id)
    assert len(runs) == 1 and runs[0].description == "scheduled"
    assert again.active_run_id == runs[0].id and again.runs_started == 1
    assert again.next_run_at is not None and again.next_run_at > utcnow() + timedelta(minutes=59)
    assert sum(len(t.calls) for t in transports) == 1
    # Its time comes again while the run still works: no second run, the job waits for its lock.
    with raksha_db.begin() as s:
        db.update_job(s, P1, job.id, next_run_at=utcnow() - timedelta(seconds=1))
    assert [sch.fire_due() for sch in schedulers] == [[], [], [], []]

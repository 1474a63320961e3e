"""The seed's "job scheduler for periodic backups", and recovery of work a stopped server left behind.

Every tick, jobs whose ``next_run_at`` has come get a run (full or incremental by their policy)
and their next time. A job never has two runs at once: the run takes the job's lock, and a
job still running when its time comes is simply rescheduled. On start, runs and restores that
were working when the previous process stopped are failed with ``INTERRUPTED`` (their vault
data is complete per disk or absent: nothing half-written is ever used); queued ones are
started again; deletions resume.
"""

from __future__ import annotations

import logging
import threading

from raksha.db import Database
from raksha.db import api as db
from raksha.db.types import utcnow
from raksha.domain.errors import RakshaError
from raksha.domain.states import RunStatus
from raksha.rpc.inproc import InProcessTransport
from raksha.services import schedule

LOG = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, database: Database, transport: InProcessTransport, *, tick: float = 5.0) -> None:
        self.db = database
        self.rpc = transport
        self.tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def recover(self) -> None:
        with self.db.begin() as s:
            runs = [(r.project_id, r.id, r.status) for r in db.unfinished_runs(s)]
            restores = [(r.project_id, r.id, r.status) for r in db.unfinished_restores(s)]
        for project, run_id, status in runs:
            try:
                if status == RunStatus.QUEUED:
                    self.rpc.cast("orchestrator", "run_backup", project_id=project, run_id=run_id)
                elif status == RunStatus.DELETING:
                    self.rpc.cast("orchestrator", "delete_run", project_id=project, run_id=run_id)
                else:
                    with self.db.begin() as s:
                        run = db.get_run(s, project, run_id)
                        for vm in run.vms:
                            if vm.status in ("queued", "snapshotting", "uploading"):
                                db.transition_run_vm(s, project, vm.id, "error", error_code="INTERRUPTED",
                                                     error_message="the server stopped during the run")
                        db.settle_run(s, project, run_id, error_code="INTERRUPTED",
                                      error_message="the server stopped during the run; run it again")
            except RakshaError:
                LOG.exception("could not recover run %s", run_id)
        for project, restore_id, status in restores:
            try:
                if status == "queued":
                    self.rpc.cast("orchestrator", "run_restore", project_id=project, restore_id=restore_id)
                else:
                    with self.db.begin() as s:
                        db.transition_restore(s, project, restore_id, "error", error_code="INTERRUPTED",
                                              error_message="the server stopped during the restore; run it again")
            except RakshaError:
                LOG.exception("could not recover restore %s", restore_id)

    def fire_due(self) -> list[str]:
        """Start a run of every job whose time has come; returns the new runs' ids."""
        started = []
        now = utcnow()
        with self.db.begin() as s:
            due = [(j.project_id, j.user_id, j.id) for j in db.due_jobs(s, now)]
        for project, user, job_id in due:
            try:
                with self.db.begin() as s:  # the next time is set even if this one cannot start
                    job = db.get_job(s, project, job_id)
                    db.update_job(s, project, job_id, next_run_at=schedule.next_fire(
                        job.schedule_interval_seconds, job.schedule_cron, now))
                with self.db.begin() as s:
                    parent = db.latest_run(s, project, job_id)
                    kind = schedule.choose_type("auto", job, parent is not None)
                    run = db.create_run(s, project, user, job_id, backuptype=kind, description="scheduled",
                                        parent_run_id=parent.id if kind == "incremental" and parent else None)
                self.rpc.cast("orchestrator", "run_backup", project_id=project, run_id=run.id)
                started.append(run.id)
            except RakshaError as exc:
                LOG.warning("scheduled run of job %s not started: %s", job_id, exc)
        return started

    def _loop(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.fire_due()
            except Exception:
                LOG.exception("scheduler tick failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="raksha-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

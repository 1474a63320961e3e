"""The seed's "job scheduler for periodic backups", and recovery of work a stopped server left behind.

Every tick, jobs whose ``next_run_at`` has come get a run (full or incremental by their policy)
and their next time. A job never has two runs at once: the run takes the job's lock, and a
job still running when its time comes gets its next run as soon as that one ends (one run,
however many times were missed meanwhile). On start, runs and restores that
were working when the previous process stopped are failed with ``INTERRUPTED`` (their vault
data is complete per disk or absent: nothing half-written is ever used); queued ones are
started again; deletions resume.

Vault space that no backup uses any more (after retention or a deleted run) is reclaimed by the
vault's garbage collection (raksha.vault.operations.gc: mark and sweep with a grace period, safe
while backups run), on its own thread: every ``gc_interval`` seconds, and soon after runs were
deleted (retention, the API).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from raksha.db import Database
from raksha.db import api as db
from raksha.db.types import utcnow
from raksha.domain.errors import RakshaError
from raksha.domain.states import RunStatus
from raksha.rpc.inproc import InProcessTransport
from raksha.services import schedule, vaults
from raksha.vault.operations.gc import collect_garbage

LOG = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, database: Database, transport: InProcessTransport, *, tick: float = 5.0,
                 gc_interval: float = 86400.0, gc_grace: float = 3600.0, gc_max_wait: float = 600.0) -> None:
        self.db = database
        self.rpc = transport
        self.tick = tick
        self.gc_interval = gc_interval
        self.gc_grace = gc_grace
        self.gc_max_wait = gc_max_wait
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gc_wanted = threading.Event()
        self._gc_thread: threading.Thread | None = None
        #: The reports of the last collection, per vault service id (for tests and logs).
        self.last_gc: dict[str, dict[str, Any]] = {}

    def recover(self) -> None:
        with self.db.begin() as s:
            runs = [(r.project_id, r.id, r.status) for r in db.unfinished_runs(s)]
            restores = [(r.project_id, r.id, r.status) for r in db.unfinished_restores(s)]
        interrupted_vms: list[str] = []
        for project, run_id, status in runs:
            try:
                if status == RunStatus.QUEUED:
                    self.rpc.cast("orchestrator", "run_backup", project_id=project, run_id=run_id)
                elif status == RunStatus.DELETING:
                    self.rpc.cast("orchestrator", "delete_run", project_id=project, run_id=run_id)
                else:
                    with self.db.begin() as s:
                        run = db.get_run(s, project, run_id)
                        interrupted_vms += [vm.vm_id for vm in run.vms]
                        for vm in run.vms:
                            if vm.status in ("queued", "snapshotting", "uploading"):
                                db.transition_run_vm(s, project, vm.id, "error", error_code="INTERRUPTED",
                                                     error_message="the server stopped during the run")
                        db.settle_run(s, project, run_id, error_code="INTERRUPTED",
                                      error_message="the server stopped during the run; run it again")
            except RakshaError:
                LOG.exception("could not recover run %s", run_id)
        if interrupted_vms:
            try:  # the dead process's pull jobs: ended and their guests thawed now, not at the next run
                ended = self.rpc.call("agent", "end_stale_jobs", refs=sorted(set(interrupted_vms)))
                if ended:
                    LOG.info("ended the pull jobs an interrupted run left on %s", ", ".join(ended))
            except Exception:
                LOG.exception("could not end the pull jobs of interrupted runs")
        for project, restore_id, status in restores:
            try:
                if status == "queued":
                    self.rpc.cast("orchestrator", "run_restore", project_id=project, restore_id=restore_id)
                else:
                    with self.db.begin() as s:
                        db.transition_restore(s, project, restore_id, "error", error_code="INTERRUPTED",
                                              error_message="the server stopped during the restore; run it again")
                    try:  # its half-written disks in the server's own directory, and VMs defined on them
                        self.rpc.call("orchestrator", "discard_interrupted_restore", project_id=project,
                                      restore_id=restore_id)
                    except Exception:
                        LOG.exception("could not remove what interrupted restore %s made", restore_id)
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

    def request_gc(self) -> None:
        """Collect every vault's garbage soon (retention deleted runs); requests coalesce."""
        self._gc_wanted.set()

    def collect_garbage(self) -> dict[str, dict[str, Any]]:
        """Free what no backup uses in every vault that exists; returns each vault service's report."""
        # A vault another gc holds, or whose backups outlast max_wait, is skipped until next time.
        done = vaults.on_local_vaults(self.db, "gc", lambda vault: collect_garbage(
            vault, grace=self.gc_grace, max_wait=self.gc_max_wait))
        reports: dict[str, dict[str, Any]] = {}
        for row, report in done:
            LOG.info("vault service %s: %s", row.name, report.summary())
            reports[row.id] = report.to_dict()
        self.last_gc = reports
        return reports

    def _gc_loop(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            timeout = max(0.0, last + self.gc_interval - time.monotonic()) if self.gc_interval else None
            wanted = self._gc_wanted.wait(timeout)
            if self._stop.is_set():
                return
            self._gc_wanted.clear()
            if not wanted and not self.gc_interval:
                continue
            try:
                self.collect_garbage()
            except Exception:
                LOG.exception("vault garbage collection failed")
            last = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.fire_due()
            except Exception:
                LOG.exception("scheduler tick failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="raksha-scheduler", daemon=True)
        self._thread.start()
        self._gc_thread = threading.Thread(target=self._gc_loop, name="raksha-gc", daemon=True)
        self._gc_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._gc_wanted.set()  # wake the gc thread (a collection in progress ends on its own)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._gc_thread is not None:
            self._gc_thread.join(timeout=5)

"""Runs and restores carried out: state machines driven, the agent asked, its reports recorded.

A run goes queued → snapshotting → uploading → available | partial | error | cancelled, and so
does each of its VMs and disks (raksha.domain.states). A VM that fails is reported on that VM;
the run's outcome says whether it failed in part or whole. Progress (percent, bytes, ETA) is
written at most once a second. A cancel is seen at the next progress report of any disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from raksha.db import Database
from raksha.db import api as db
from raksha.db.models import BackupJobRun, VaultService
from raksha.domain import retention
from raksha.domain.errors import NotFound, RakshaError
from raksha.domain.states import PARENT_RUN_STATUSES, RUN_VM, RunStatus, VmStatus
from raksha.hypervisor.group_backup import GroupResult, VmResult
from raksha.hypervisor.restore import RestoreRequest
from raksha.services import vaults
from raksha.services.agent import LibvirtAgent
from raksha.services.views import weakest
from raksha.vault.engine.progress import ProgressEvent
from raksha.vault.format.naming import BackupId
from raksha.vault.sources.open import discard_staged

LOG = logging.getLogger(__name__)
RETIRE_SCAN = 50  # newest runs of a job looked at for tracking to retire
_VM_PATH: list[str] = [VmStatus.QUEUED, VmStatus.SNAPSHOTTING, VmStatus.UPLOADING, VmStatus.AVAILABLE]


def _walk(move: Callable[[str], Any], current: str, target: str) -> None:
    """Step a VM or disk along queued → snapshotting → uploading → available up to ``target``."""
    for status in _VM_PATH[_VM_PATH.index(current) + 1:_VM_PATH.index(target) + 1]:
        move(status)


class _Meter:
    """Bytes done over every disk of a run, written to the run at most once a second."""

    def __init__(self, flush: Callable[[int, int, float | None], None]) -> None:
        self._disks: dict[tuple[str, str], ProgressEvent] = {}
        self._flush = flush
        self._last = 0.0
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one write at a time: events come from every disk's workers at once
        self.started = False

    def __call__(self, vm: str, disk: str, event: ProgressEvent) -> None:
        with self._lock:
            self._disks[(vm, disk)] = event
            now = time.monotonic()
            if now - self._last < 1.0:
                return
            self._last = now
            done = sum(e.done for e in self._disks.values())
            total = sum(e.total for e in self._disks.values())
            eta = max((e.eta or 0.0) for e in self._disks.values())
        if self._flushing.acquire(blocking=False):  # a write under way: this one is skipped, the next counts
            try:
                self._flush(done, total, eta)
            finally:
                self._flushing.release()


class Orchestrator:
    def __init__(self, database: Database, agent: LibvirtAgent, *, restore_dir: str) -> None:
        self.db = database
        self.agent = agent
        self.restore_dir = restore_dir
        self._cancel: set[str] = set()
        #: Called after runs were deleted (retention, the API): the scheduler then collects the vault's garbage.
        self.on_pruned: Callable[[], None] | None = None

    # -- cancellation ----------------------------------------------------------------------------

    def request_cancel(self, resource_id: str) -> None:
        self._cancel.add(resource_id)

    def _cancelled(self, resource_id: str) -> Callable[[], bool]:
        return lambda: resource_id in self._cancel

    # -- runs ------------------------------------------------------------------------------------

    def _vault_row(self, session: Any, project_id: str, vault_service_id: str | None) -> VaultService:
        if vault_service_id is not None:
            return db.get_vault_service(session, project_id, vault_service_id)
        row = vaults.find_default(session)
        if row is not None:
            return row
        raise NotFound("no vault service configured and no default local vault", code="VAULT_SERVICE_NOT_FOUND")

    def run_backup(self, project_id: str, run_id: str) -> None:
        try:
            self._run_backup(project_id, run_id)
        except Exception as exc:  # never leave a run hanging in a working state
            LOG.exception("run %s failed", run_id)
            self._fail_run(project_id, run_id, exc)
        finally:
            self._cancel.discard(run_id)

    def _run_backup(self, project_id: str, run_id: str) -> None:
        with self.db.begin() as s:
            run = db.get_run(s, project_id, run_id)
            if run.status != RunStatus.QUEUED:
                return  # cancelled before it started, or taken by another worker
            run = db.transition_run(s, project_id, run_id, RunStatus.SNAPSHOTTING, expected=RunStatus.QUEUED)
            job = db.get_job(s, project_id, run.backupjob_id)
            vault_row = self._vault_row(s, project_id, job.vault_service_id)
            excluded = job.excluded_disks or {}
            wanted = job.consistency  # crash | filesystem | application; None: the best each VM reaches
            retire = self._retired_runs(s, project_id, job.id, run)
            for vm in run.vms:
                db.transition_run_vm(s, project_id, vm.id, VmStatus.SNAPSHOTTING)
            vms = [(vm.id, vm.vm_id) for vm in run.vms]
        # Which domains the job's VM references name now (a VM may be gone since the job was made).
        names: dict[str, str] = {}  # domain name -> run VM row
        exclude: dict[str, set[str]] = {}
        for row_id, ref in vms:
            try:
                found = self.agent.describe_vm(ref)
            except RakshaError as exc:
                with self.db.begin() as s:
                    db.transition_run_vm(s, project_id, row_id, VmStatus.ERROR, error_code=exc.code,
                                         error_message=exc.message)
                continue
            names[found["name"]] = row_id
            exclude[found["name"]] = set(excluded.get(ref, []))
            with self.db.begin() as s:
                db.update_run_vm(s, project_id, row_id, vm_id=found["uuid"], vm_name=found["name"])
        result = None
        if names:
            meter = _Meter(lambda done, total, eta: self._progress(project_id, run_id, list(names.values()),
                                                                   done, total, eta, meter))
            vault = vaults.open_vault(vault_row)
            try:
                result = self.agent.backup(vault, job.id, run_id, list(names), parent_run=run.parent_run_id,
                                           exclude=exclude, progress=meter, cancelled=self._cancelled(run_id),
                                           consistency=wanted, retire_runs=retire)
            finally:
                vault.close()
        with self.db.begin() as s:
            if result is not None:
                self._record(s, project_id, run, vault_row, names, result)
            run = db.settle_run(s, project_id, run_id, progress_percent=100, eta_seconds=0)
            LOG.info("run %s of job %s: %s", run_id, job.id, run.status)
        if run.status in (RunStatus.AVAILABLE, RunStatus.PARTIAL) and job.retention:
            self.apply_retention(project_id, job.id, job.retention)

    def _progress(self, project_id: str, run_id: str, vm_rows: list[str], done: int, total: int,
                  eta: float | None, meter: _Meter) -> None:
        with self.db.begin() as s:
            if not meter.started:
                meter.started = True
                run = db.get_run(s, project_id, run_id)
                if run.status == RunStatus.SNAPSHOTTING:
                    db.transition_run(s, project_id, run_id, RunStatus.UPLOADING, expected=RunStatus.SNAPSHOTTING)
                for vm in run.vms:
                    if vm.id in vm_rows and vm.status == VmStatus.SNAPSHOTTING:
                        db.transition_run_vm(s, project_id, vm.id, VmStatus.UPLOADING)
            percent = min(99, int(100 * done / total)) if total else 0
            db.update_run(s, project_id, run_id, bytes_done=done, bytes_total=total, progress_percent=percent,
                          eta_seconds=int(eta) if eta is not None else None)

    @staticmethod
    def _retired_runs(s: Any, project_id: str, job_id: str, run: BackupJobRun) -> list[str]:
        """The job's runs whose changed-block tracking this run retires once it succeeds: those that ended
        in error or were cancelled since the last good run (a run killed mid-way leaves its checkpoint and
        bitmaps), and for a full run, which starts a new chain, the last good run itself. An incremental's
        parent is retired by the driver."""
        retire = []
        for older in db.list_runs(s, project_id, job_id=job_id, limit=RETIRE_SCAN):
            if older.id == run.id or older.created_at > run.created_at:
                continue
            if older.status in PARENT_RUN_STATUSES:
                if run.parent_run_id is None:
                    retire.append(older.id)
                break
            if older.status in (RunStatus.ERROR, RunStatus.CANCELLED):
                retire.append(older.id)
        return retire

    def _record(self, s: Any, project_id: str, run: BackupJobRun, vault_row: VaultService,
                names: dict[str, str], result: GroupResult) -> None:
        parent = db.get_run(s, project_id, run.parent_run_id) if run.parent_run_id else None
        parent_backups: dict[tuple[str, str], str] = {}
        if parent is not None:
            for pvm in parent.vms:
                for res in pvm.resources:
                    top = next((b for b in res.backups if b.top and not b.deleted), None)
                    if top is not None:
                        parent_backups[(pvm.vm_id, res.resource_name)] = top.id
        read = stored = 0
        for vm in result.vms:
            row_id = names[vm.name]
            self._record_vm(s, project_id, row_id, vm, vault_row, parent_backups)
            read += sum(d.bytes_read for d in vm.disks)
            stored += sum(d.bytes_stored for d in vm.disks)
        levels = [vm.consistency for vm in result.vms if vm.error is None]
        db.update_run(s, project_id, run.id, consistency=weakest(levels), freeze_ms=int(result.freeze_ms),
                      bytes_done=read, bytes_total=max(read, run.bytes_total or 0))

    def _record_vm(self, s: Any, project_id: str, row_id: str, vm: VmResult, vault_row: VaultService,
                   parent_backups: dict[tuple[str, str], str]) -> None:
        for disk in vm.disks:
            res = db.add_run_vm_resource(s, project_id, row_id, resource_name=disk.target, backuptype=disk.kind,
                                         tracking=disk.tracking, consistency=vm.consistency,
                                         bytes_read=disk.bytes_read, bytes_stored=disk.bytes_stored)
            for status in _VM_PATH[1:]:
                db.transition_run_vm_resource(s, project_id, res.id, status)
            backing = parent_backups.get((vm.uuid, disk.target)) if disk.kind == "incremental" else None
            backup = db.add_vm_resource_backup(
                s, project_id, res.id, vm_resource_backup_backing_id=backing, vault_service_id=vault_row.id,
                vault_service_url=vaults.backup_url(vault_row, disk.backup_id), vault_backup_id=disk.backup_id,
                vault_service_metadata={"tracking": disk.tracking, "method": disk.method, "kind": disk.kind},
                bytes_read=disk.bytes_read, bytes_stored=disk.bytes_stored)
            db.transition_vm_resource_backup(s, project_id, backup.id, "available")
        vm_row = db.update_run_vm(s, project_id, row_id, consistency=vm.consistency, consistency_note=vm.why or None,
                                  excluded_disks=vm.excluded or None, warnings=vm.warnings or None,
                                  bytes_read=sum(d.bytes_read for d in vm.disks),
                                  bytes_stored=sum(d.bytes_stored for d in vm.disks))
        if vm.error is not None:
            target = VmStatus.CANCELLED if vm.error.get("code") == "CANCELLED" else VmStatus.ERROR
            db.transition_run_vm(s, project_id, row_id, target, error_code=vm.error.get("code"),
                                 error_message=vm.error.get("message"))
        else:
            def move(status: str) -> None:
                db.transition_run_vm(s, project_id, row_id, status)

            _walk(move, vm_row.status, VmStatus.AVAILABLE)

    def _fail_run(self, project_id: str, run_id: str, exc: BaseException) -> None:
        code = exc.code if isinstance(exc, RakshaError) else "INTERNAL_ERROR"
        message = exc.message if isinstance(exc, RakshaError) else f"{type(exc).__name__}: {exc}"
        try:
            with self.db.begin() as s:
                run = db.get_run(s, project_id, run_id)
                for vm in run.vms:
                    if not RUN_VM.is_terminal(vm.status):
                        target = VmStatus.CANCELLED if code == "CANCELLED" else VmStatus.ERROR
                        db.transition_run_vm(s, project_id, vm.id, target, error_code=code, error_message=message)
                db.settle_run(s, project_id, run_id, error_code=code, error_message=message)
        except Exception:
            LOG.exception("could not record the failure of run %s", run_id)

    # -- deleting runs, retention ----------------------------------------------------------------

    def delete_run(self, project_id: str, run_id: str, *, collect: bool = True) -> None:
        """Delete a run's vault data that no other run references, then the run (resumable: a
        ``deleting`` run is deleted again from where it stopped); then the backups of earlier deleted
        runs that were kept only as this run's backing and that nothing references any more.
        ``collect``: ask for the vault's garbage collection afterwards (``on_pruned``)."""
        with self.db.begin() as s:
            run = db.get_run(s, project_id, run_id)
            if run.status != RunStatus.DELETING:
                run = db.transition_run(s, project_id, run_id, RunStatus.DELETING)
            job = db.get_job(s, project_id, run.backupjob_id)
            vault_row = self._vault_row(s, project_id, job.vault_service_id)
            backups = [(b.id, b.status, b.vault_backup_id) for b in db.deletable_backups(s, project_id, run_id)]
        self._delete_backups(project_id, vault_row, backups)
        with self.db.begin() as s:
            db.transition_run(s, project_id, run_id, RunStatus.DELETED)
        self._delete_orphans(project_id)
        if collect and self.on_pruned is not None:
            self.on_pruned()

    def _delete_backups(self, project_id: str, vault_row: VaultService,
                        backups: list[tuple[str, str, str | None]]) -> None:
        vault = vaults.open_vault(vault_row) if backups else None
        try:
            for backup_id, status, vault_id in backups:
                with self.db.begin() as s:
                    if status != "deleting":
                        db.transition_vm_resource_backup(s, project_id, backup_id, "deleting")
                if vault is not None and vault_id:
                    try:
                        vault.delete_backup(BackupId.parse(vault_id))
                    except NotFound:
                        pass  # already gone: a resumed deletion
                with self.db.begin() as s:
                    db.transition_vm_resource_backup(s, project_id, backup_id, "deleted")
        finally:
            if vault is not None:
                vault.close()

    def _delete_orphans(self, project_id: str) -> None:
        """Backups of deleted runs that were kept as a backing and are referenced no more: each deletion may
        free the next one down the chain."""
        for _ in range(1000):
            with self.db.begin() as s:
                orphans = db.orphaned_backups(s, project_id)
                by_vault: dict[str | None, list[tuple[str, str, str | None]]] = {}
                for b in orphans:
                    by_vault.setdefault(b.vault_service_id, []).append((b.id, b.status, b.vault_backup_id))
                rows = {vid: self._vault_row(s, project_id, vid) for vid in by_vault}
            if not orphans:
                return
            for vid, backups in by_vault.items():
                self._delete_backups(project_id, rows[vid], backups)

    def apply_retention(self, project_id: str, job_id: str, policy_doc: dict[str, Any]) -> list[str]:
        """Delete the job's runs its retention policy no longer keeps; returns their ids."""
        try:
            policy = retention.RetentionPolicy(**{k: v for k, v in policy_doc.items() if v})
            if policy.is_empty():
                return []
            with self.db.begin() as s:
                runs = db.list_runs(s, project_id, job_id=job_id, limit=1000)
                snaps = [retention.Snapshot(r.id, r.created_at, job_id) for r in runs
                         if r.status in (RunStatus.AVAILABLE, RunStatus.PARTIAL)]
            forget = [snap.id for snap in retention.apply(policy, snaps).forget]
        except RakshaError:
            LOG.exception("retention of job %s", job_id)
            return []
        for rid in forget:
            try:
                self.delete_run(project_id, rid, collect=False)
            except RakshaError:
                LOG.exception("retention could not delete run %s", rid)
        if forget:
            LOG.info("retention of job %s deleted %d run(s)", job_id, len(forget))
            if self.on_pruned is not None:
                self.on_pruned()
        return forget

    # -- restores --------------------------------------------------------------------------------

    def run_restore(self, project_id: str, restore_id: str) -> None:
        try:
            self._run_restore(project_id, restore_id)
        except Exception as exc:
            LOG.exception("restore %s failed", restore_id)
            code = exc.code if isinstance(exc, RakshaError) else "INTERNAL_ERROR"
            message = exc.message if isinstance(exc, RakshaError) else f"{type(exc).__name__}: {exc}"
            if code == "CANCELLED" and isinstance(exc, RakshaError) and exc.details.get("restored"):
                try:  # a cancelled restore leaves nothing: not even the VMs it finished before the cancel
                    with self.db.begin() as s:
                        restore_type = db.get_restore(s, project_id, restore_id).restore_type
                    self.agent.discard_restored(restore_type, exc.details["restored"])
                except Exception:
                    LOG.exception("could not remove what cancelled restore %s made", restore_id)
            try:
                with self.db.begin() as s:
                    target = "cancelled" if code == "CANCELLED" else "error"
                    db.transition_restore(s, project_id, restore_id, target, error_code=code, error_message=message)
            except Exception:
                LOG.exception("could not record the failure of restore %s", restore_id)
            own = os.path.join(self.restore_dir, restore_id)
            try:
                os.rmdir(own)  # the server's own directory for it, when the restore left nothing there
            except OSError:
                pass
        finally:
            self._cancel.discard(restore_id)

    def discard_interrupted_restore(self, project_id: str, restore_id: str) -> None:
        """After a restart: remove what a restore killed mid-way made in the server's own directory for it
        (its disks; for new VMs, the domains defined on them). In a directory the caller named, only the
        half-written disk images (``*.raksha-partial`` under this restore's output names) go: disks and
        domains it finished stay, as a caller's directory is theirs."""
        with self.db.begin() as s:
            r = db.get_restore(s, project_id, restore_id)
            target, selection = r.target or {}, r.selection or {}
            try:
                run: BackupJobRun | None = db.get_run(s, project_id, r.backupjobrun_id)
            except NotFound:
                run = None
            vms = selection.get("vms") or ([vm.vm_id for vm in run.vms] if run is not None else [])
            prefix = target.get("name_prefix") or f"restored-{restore_id[:8]}"
            new_names = _new_names(run, vms, prefix) if run is not None and r.restore_type == "new_vm" else {}
            names = list(new_names.values())
            if target.get("directory"):
                if run is not None:
                    _discard_partials(target["directory"], run, vms, new_names, selection.get("disks"),
                                      target.get("format", "qcow2"))
                return
        directory = os.path.join(self.restore_dir, restore_id)
        if names and os.path.isdir(directory):
            self.agent.discard_domains_under(names, directory)
        _discard_tree(directory)

    def _run_restore(self, project_id: str, restore_id: str) -> None:
        with self.db.begin() as s:
            r = db.get_restore(s, project_id, restore_id)
            if r.status != "queued":
                return
            r = db.transition_restore(s, project_id, restore_id, "restoring", expected="queued")
            run = db.get_run(s, project_id, r.backupjobrun_id)
            job = db.get_job(s, project_id, run.backupjob_id)
            vault_row = self._vault_row(s, project_id, job.vault_service_id)
            available = [vm.vm_id for vm in run.vms if vm.status == VmStatus.AVAILABLE]
        selection, target = r.selection or {}, r.target or {}
        vms = selection.get("vms") or available  # a partial run restores the VMs that made it
        prefix = target.get("name_prefix") or f"restored-{restore_id[:8]}"
        directory = target.get("directory")
        if not directory:  # the server's own place: made here; a directory the caller names must exist
            directory = os.path.join(self.restore_dir, restore_id)
            os.makedirs(directory, mode=0o755, exist_ok=True)
        request = RestoreRequest(
            job=job.id, run=run.id, type=r.restore_type, vms=vms, disks=selection.get("disks"),
            target_dir=directory,
            fmt=target.get("format", "qcow2"), keep_macs=bool(target.get("keep_macs", False)),
            start=bool(target.get("start", True)), changed_only=not target.get("rewrite_whole", False),
            read_back=bool(target.get("read_back", False)),
            names=_new_names(run, vms, prefix) if r.restore_type == "new_vm" else {})

        last = [0.0]

        def progress(event: ProgressEvent) -> None:
            now = time.monotonic()
            if now - last[0] < 1.0 and event.done < event.total:
                return
            last[0] = now
            with self.db.begin() as s:
                db.update_restore(s, project_id, restore_id, bytes_done=event.done, bytes_total=event.total,
                                  progress_percent=min(99, int(100 * event.fraction)),
                                  eta_seconds=int(event.eta) if event.eta is not None else None)

        vault = vaults.open_vault(vault_row)
        try:
            report = self.agent.restore(vault, request, progress=progress, cancelled=self._cancelled(restore_id))
        finally:
            vault.close()
        with self.db.begin() as s:
            db.transition_restore(s, project_id, restore_id, "available", results=report.to_dict(),
                                  progress_percent=100, eta_seconds=0, bytes_done=report.bytes_written)


def _discard_tree(directory: str) -> None:
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(root, name))
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root, name))
    with contextlib.suppress(OSError):
        os.rmdir(directory)


def _discard_partials(directory: str, run: BackupJobRun, vms: list[str], new_names: dict[str, str],
                      disks: list[str] | None, fmt: str) -> None:
    """Unlink the half-written images a killed restore left for its outputs in ``directory``
    (``<vm name>-<disk>.<fmt>`` for files, ``<new name>-<disk>.<fmt>`` for new VMs; see
    raksha.hypervisor.restore), never another file."""
    for vm in run.vms:
        if not (vm.vm_id in vms or (vm.vm_name and vm.vm_name in vms)):
            continue
        name = new_names.get(vm.vm_id) or vm.vm_name or vm.vm_id
        for res in vm.resources:
            if disks and res.resource_name not in disks:
                continue
            for staged in discard_staged(os.path.join(directory, f"{name}-{res.resource_name}.{fmt}")):
                LOG.info("removed %s from %s, left by an interrupted restore", staged, directory)


def _new_names(run: BackupJobRun, vms: list[str], prefix: str) -> dict[str, str]:
    out = {}
    for vm in run.vms:
        if vm.vm_id in vms or (vm.vm_name and vm.vm_name in vms):
            out[vm.vm_id] = f"{prefix}-{vm.vm_name or vm.vm_id[:8]}"
    return out

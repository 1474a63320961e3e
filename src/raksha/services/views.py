"""Rows as the API shows them: jobs, runs (with VMs and disks) and restores; the 2013 client's fields too."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from raksha.db.models import BackupJob, BackupJobRun, BackupJobRunVm, BackupJobRunVmResource, Restore

CONSISTENCY_ORDER = ["crash", "filesystem", "application"]


def iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t is not None else None


def _error(code: str | None, message: str | None) -> dict[str, Any] | None:
    return {"code": code, "message": message or ""} if code else None


def job_view(job: BackupJob, base: str, *, size: int = 0, last_run: BackupJobRun | None = None) -> dict[str, Any]:
    excluded = job.excluded_disks or {}
    interval = job.schedule_interval_seconds
    schedule: dict[str, Any] | None = None
    if interval or job.schedule_cron:
        schedule = {"enabled": job.schedule_enabled, "full_every": job.full_every,
                    "next_run_at": iso(job.next_run_at)}
        if interval:
            schedule["interval_hours"] = interval / 3600
        if job.schedule_cron:
            schedule["cron"] = job.schedule_cron
    vms = [{"id": vm.vm_id, "exclude_disks": list(excluded.get(vm.vm_id, []))} for vm in job.vms]
    return {
        "id": job.id, "name": job.name, "description": job.description, "status": job.status,
        "project_id": job.project_id, "user_id": job.user_id, "vms": vms,
        "vault_service": job.vault_service_id, "schedule": schedule, "retention": job.retention,
        "consistency": job.consistency,
        "created_at": iso(job.created_at), "updated_at": iso(job.updated_at),
        "last_run": ({"id": last_run.id, "status": last_run.status, "type": last_run.backuptype,
                      "created_at": iso(last_run.created_at)} if last_run is not None else None),
        "vm_id": vms[0]["id"] if vms else None,
        "hours": int(interval // 3600) if interval and interval % 3600 == 0 else None,
        "size": size, "fail_reason": None,
        "links": [{"rel": "self", "href": f"{base}/backupjobs/{job.id}"}],
    }


def _disk_view(res: BackupJobRunVmResource) -> dict[str, Any]:
    top = next((b for b in res.backups if b.top and not b.deleted), None)
    return {
        "target": res.resource_name, "type": res.backuptype, "status": res.status, "format": res.disk_format,
        "tracking": res.tracking, "bytes_read": res.bytes_read, "bytes_stored": res.bytes_stored,
        "vm_resource_backup_id": top.id if top else None,
        "backing_backup_id": top.vm_resource_backup_backing_id if top else None,
        "vault_url": top.vault_service_url if top else None,
        "error": _error(res.error_code, res.error_message),
    }


def _vm_view(vm: BackupJobRunVm, freeze_ms: int | None) -> dict[str, Any]:
    return {
        "vm_id": vm.vm_id, "name": vm.vm_name, "uuid": vm.vm_id, "status": vm.status,
        "consistency": vm.consistency, "consistency_note": vm.consistency_note, "freeze_ms": freeze_ms,
        "error": _error(vm.error_code, vm.error_message),
        "disks": [_disk_view(r) for r in vm.resources if not r.deleted],
        "excluded_disks": list(vm.excluded_disks or []),
        "warnings": list(vm.warnings or []),
    }


def run_view(run: BackupJobRun, base: str, *, with_vms: bool = True) -> dict[str, Any]:
    vms = [_vm_view(vm, run.freeze_ms) for vm in run.vms if not vm.deleted] if with_vms else []
    stored = sum(d["bytes_stored"] for vm in vms for d in vm["disks"])
    return {
        "id": run.id, "backupjob_id": run.backupjob_id, "type": run.backuptype, "status": run.status,
        "description": run.description, "progress_percent": run.progress_percent, "bytes_done": run.bytes_done,
        "bytes_total": run.bytes_total or 0, "eta_seconds": run.eta_seconds, "consistency": run.consistency,
        "freeze_ms": run.freeze_ms, "parent_run_id": run.parent_run_id,
        "size": stored, "fail_reason": run.error_message, "error": _error(run.error_code, run.error_message),
        "created_at": iso(run.created_at), "started_at": iso(run.started_at), "finished_at": iso(run.finished_at),
        # The scheduled verification's word: null until every pack the run uses was re-read since it finished.
        "verify_state": run.verify_state, "verified_at": iso(run.verified_at), "verify_note": run.verify_note,
        "vms": vms,
        "links": [{"rel": "self", "href": f"{base}/backupjobs/{run.backupjob_id}/backupjobsruns/{run.id}"}],
    }


def restore_view(r: Restore, base: str, *, job_id: str | None = None) -> dict[str, Any]:
    selection = r.selection or {}
    results = (r.results or {}).get("vms", [])
    return {
        "id": r.id, "backupjobrun_id": r.backupjobrun_id, "backupjob_id": job_id, "type": r.restore_type,
        "status": r.status, "description": r.description, "progress_percent": r.progress_percent,
        "bytes_done": r.bytes_done, "bytes_total": r.bytes_total or 0, "eta_seconds": r.eta_seconds,
        "vms": selection.get("vms"), "disks": selection.get("disks"), "target": r.target,
        "results": results, "fail_reason": r.error_message, "error": _error(r.error_code, r.error_message),
        "created_at": iso(r.created_at), "finished_at": iso(r.finished_at),
        "links": [{"rel": "self", "href": f"{base}/restores/{r.id}"}],
    }


def weakest(levels: Sequence[str | None]) -> str | None:
    """The consistency a group of VMs reached together: the weakest of theirs."""
    known = [lv for lv in levels if lv in CONSISTENCY_ORDER]
    return min(known, key=CONSISTENCY_ORDER.index) if known else None

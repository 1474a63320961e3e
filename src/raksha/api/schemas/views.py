"""JSON schemas of what the API answers: the resources as clients see them (and the OpenAPI document says)."""

from __future__ import annotations

from typing import Any

from raksha.api.schemas.backupjob import CONSISTENCY

STR: dict[str, Any] = {"type": "string"}
NSTR: dict[str, Any] = {"type": ["string", "null"]}
INT: dict[str, Any] = {"type": "integer"}
NINT: dict[str, Any] = {"type": ["integer", "null"]}
NNUM: dict[str, Any] = {"type": ["number", "null"]}
LINKS: dict[str, Any] = {"type": "array", "items": {"type": "object", "required": ["rel", "href"],
                                                    "properties": {"rel": STR, "href": STR}}}
ERROR_REF: dict[str, Any] = {"type": ["object", "null"], "properties": {"code": STR, "message": STR}}
PROGRESS: dict[str, Any] = {"progress_percent": {"type": "number", "minimum": 0, "maximum": 100},
                            "bytes_done": INT, "bytes_total": INT, "eta_seconds": NNUM}

RUN_STATUS = ["queued", "snapshotting", "uploading", "available", "partial", "error", "cancelling", "cancelled",
              "deleting"]
RESTORE_STATUS = ["queued", "restoring", "available", "error", "cancelling", "cancelled"]

BACKUPJOB: dict[str, Any] = {
    "type": "object",
    "required": ["id", "name", "status", "vms", "created_at", "consistency", "vm_id", "vault_service", "size",
                 "fail_reason"],
    "properties": {
        "id": STR, "name": STR, "description": NSTR, "status": STR, "project_id": STR, "user_id": NSTR,
        "vms": {"type": "array", "items": {"type": "object", "required": ["id"],
                                           "properties": {"id": STR, "exclude_disks": {"type": "array"}}}},
        "vault_service": NSTR, "schedule": {"type": ["object", "null"]}, "retention": {"type": ["object", "null"]},
        "consistency": CONSISTENCY,  # wanted; null: the best each VM reaches
        "created_at": STR, "updated_at": NSTR, "last_run": {"type": ["object", "null"]},
        # The 2013 client's fields.
        "vm_id": NSTR, "hours": NINT, "size": INT, "fail_reason": NSTR,
        "links": LINKS,
    },
}

DISK: dict[str, Any] = {
    "type": "object",
    "required": ["target", "status"],
    "properties": {
        "target": STR, "type": NSTR, "status": STR, "format": NSTR, "tracking": NSTR,
        "bytes_read": INT, "bytes_stored": INT, "vm_resource_backup_id": NSTR,
        "backing_backup_id": NSTR, "vault_url": NSTR, "error": ERROR_REF,
    },
}

RUN_VM: dict[str, Any] = {
    "type": "object",
    "required": ["vm_id", "status", "disks"],
    "properties": {
        "vm_id": STR, "name": NSTR, "uuid": NSTR, "status": STR, "consistency": NSTR, "consistency_note": NSTR,
        "freeze_ms": NNUM, "error": ERROR_REF, "disks": {"type": "array", "items": DISK},
        "excluded_disks": {"type": "array", "items": STR},
        # The backup is good; these say what it left for the next run (e.g. a block commit that failed).
        "warnings": {"type": "array", "items": STR},
    },
}

BACKUPJOBRUN: dict[str, Any] = {
    "type": "object",
    "required": ["id", "backupjob_id", "type", "status", "created_at", "progress_percent", "vms", "size",
                 "fail_reason"],
    "properties": {
        "id": STR, "backupjob_id": STR, "type": {"enum": ["full", "incremental"]},
        "status": {"enum": RUN_STATUS}, "description": NSTR, **PROGRESS,
        "consistency": NSTR, "size": INT, "fail_reason": NSTR, "error": ERROR_REF,
        "created_at": STR, "started_at": NSTR, "finished_at": NSTR,
        # The service's scheduled verification of the vault: null until every pack the run uses was re-read
        # and re-hashed since it finished; "damaged" as soon as a pass finds one of its chunks damaged or missing.
        "verify_state": {"enum": [None, "ok", "damaged"]}, "verified_at": NSTR, "verify_note": NSTR,
        "vms": {"type": "array", "items": RUN_VM}, "links": LINKS,
    },
}

# POST v1/{tenant_id}/backupjobs/{id}?prepare=1 (the 2013 client): what a run would do, nothing started.
PREPARED_RUN: dict[str, Any] = {
    "type": "object",
    "required": ["id", "backupjob_id", "type", "status", "vms"],
    "properties": {
        "id": {"type": "null"}, "backupjob_id": STR, "type": {"enum": ["full", "incremental"]},
        "status": {"const": "prepared"},
        "vms": {"type": "array", "items": {"type": "object", "required": ["vm_id"], "properties": {"vm_id": STR}}},
    },
}

RESTORE: dict[str, Any] = {
    "type": "object",
    "required": ["id", "backupjobrun_id", "type", "status", "progress_percent", "results", "created_at"],
    "properties": {
        "id": STR, "backupjobrun_id": STR, "backupjob_id": NSTR, "type": {"enum": ["new_vm", "files", "in_place"]},
        "status": {"enum": RESTORE_STATUS}, "description": NSTR, **PROGRESS,
        "vms": {"type": ["array", "null"]}, "disks": {"type": ["array", "null"]},
        "target": {"type": ["object", "null"]},
        "results": {"type": "array", "items": {"type": "object"}},
        "fail_reason": NSTR, "error": ERROR_REF, "created_at": STR, "finished_at": NSTR, "links": LINKS,
    },
}

ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message", "retryable"],
                             "properties": {"code": STR, "message": STR, "retryable": {"type": "boolean"},
                                            "request_id": STR, "details": {"type": "object"}}}},
}


def wrapped(key: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": [key], "properties": {key: schema}}


def collection(key: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": [key],
            "properties": {key: {"type": "array", "items": schema}, f"{key}_links": LINKS}}

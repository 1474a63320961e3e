"""Bodies of ``POST/PUT v1/{tenant_id}/backupjobs[/{id}]``: the seed's and the 2013 client's dialects."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "minLength": 1, "maxLength": 255}
DESCRIPTION = {"type": ["string", "null"], "maxLength": 1024}
VM_REF = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[^/\s]+$"}

VM = {
    "type": "object",
    "properties": {
        "id": VM_REF,  # libvirt domain name or UUID, or a Nova instance id in a cloud
        "exclude_disks": {"type": "array", "items": {"type": "string", "pattern": r"^[a-z]+[a-z0-9]*$"},
                          "uniqueItems": True},
    },
    "required": ["id"],
    "additionalProperties": False,
}

SCHEDULE = {
    "anyOf": [
        {"type": "null"},
        {
            "type": "object",
            "properties": {
                "interval_hours": {"type": "number", "exclusiveMinimum": 0, "maximum": 24 * 366},
                "cron": {"type": "string", "minLength": 9, "maxLength": 255},
                "full_every": {"type": "integer", "minimum": 0, "maximum": 10000},
                "enabled": {"type": "boolean"},
            },
            "not": {"required": ["interval_hours", "cron"]},  # one or the other
            "additionalProperties": False,
        },
    ]
}

RETENTION = {
    "type": ["object", "null"],
    "properties": {k: {"type": "integer", "minimum": 0, "maximum": 100000}
                   for k in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")},
    "additionalProperties": False,
}

_COMMON: dict[str, Any] = {
    "name": NAME,
    "description": DESCRIPTION,
    "vms": {"type": "array", "items": VM, "minItems": 1, "maxItems": 100},
    "vault_service": {"type": ["string", "null"], "minLength": 1, "maxLength": 255},
    "schedule": SCHEDULE,
    "retention": RETENTION,
    # The 2013 client: one VM and an interval in hours.
    "instance_id": VM_REF,
    "hours": {"type": ["integer", "null"], "minimum": 1, "maximum": 24 * 366},
}

CREATE = {
    "type": "object",
    "properties": {
        "backupjob": {
            "type": "object",
            "properties": _COMMON,
            # "vms", or the 2013 client's "instance_id": checked by the service with a clear message.
            "required": ["name"],
            "additionalProperties": False,
        }
    },
    "required": ["backupjob"],
    "additionalProperties": False,
}

UPDATE = {
    "type": "object",
    "properties": {
        "backupjob": {"type": "object", "properties": _COMMON, "minProperties": 1, "additionalProperties": False}
    },
    "required": ["backupjob"],
    "additionalProperties": False,
}

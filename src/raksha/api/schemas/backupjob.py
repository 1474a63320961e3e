"""Bodies of ``POST/PUT v1/{tenant_id}/backupjobs[/{id}]``: the seed's and the 2013 client's dialects."""

from __future__ import annotations

from typing import Any

from raksha.domain.states import Consistency

NAME = {"type": "string", "minLength": 1, "maxLength": 255}
DESCRIPTION = {"type": ["string", "null"], "maxLength": 1024}
# No "/" and no white space. The space characters are spelled out: "\s" means one set in Python's re (which
# validates) and another in ECMA-262 (which OpenAPI clients and generators use); this is their union.
WHITE_SPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
VM_REF = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": rf"^[^/{WHITE_SPACE}]+$"}

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

# The level the job wants (docs/design/application-consistency.md); null: the best each VM reaches.
CONSISTENCY = {"enum": [None, *(level.value for level in Consistency)]}

_COMMON: dict[str, Any] = {
    "name": NAME,
    "description": DESCRIPTION,
    "vms": {"type": "array", "items": VM, "minItems": 1, "maxItems": 100},
    "vault_service": {"type": ["string", "null"], "minLength": 1, "maxLength": 255},
    "schedule": SCHEDULE,
    "retention": RETENTION,
    "consistency": CONSISTENCY,
    # The 2013 client: one VM and an interval in hours.
    "instance_id": VM_REF,
    "hours": {"type": ["integer", "null"], "minimum": 1, "maximum": 24 * 366},
}

# A job names its VMs in "vms", or the 2013 client's "instance_id" (one VM): never both.
_NOT_BOTH = {"description": "give vms or the 2013 client's instance_id, not both",
             "not": {"required": ["vms", "instance_id"]}}
_ONE_OF_THEM = {"description": 'a backup job needs vms: [{"id": <domain name or UUID>}, ...] '
                               "(or the 2013 client's instance_id)",
                "anyOf": [{"required": ["vms"]}, {"required": ["instance_id"]}]}

CREATE = {
    "type": "object",
    "properties": {
        "backupjob": {
            "type": "object",
            "properties": _COMMON,
            "required": ["name"],
            "allOf": [_ONE_OF_THEM, _NOT_BOTH],
            "additionalProperties": False,
        }
    },
    "required": ["backupjob"],
    "additionalProperties": False,
}

UPDATE = {
    "type": "object",
    "properties": {
        "backupjob": {"type": "object", "properties": _COMMON, "minProperties": 1, "allOf": [_NOT_BOTH],
                      "additionalProperties": False}
    },
    "required": ["backupjob"],
    "additionalProperties": False,
}

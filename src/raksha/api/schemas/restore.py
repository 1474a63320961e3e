"""Body of ``POST .../backupjobsruns/{run_id}``: what to restore, how, and where. An empty body means new VMs."""

from __future__ import annotations

RESTORE = {
    "type": "object",
    "properties": {
        "restore": {
            "type": "object",
            "properties": {
                "type": {"enum": ["new_vm", "files", "in_place"]},
                "description": {"type": ["string", "null"], "maxLength": 1024},
                "vms": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 255},
                        "uniqueItems": True},
                "disks": {"type": "array", "items": {"type": "string", "pattern": r"^[a-z]+[a-z0-9]*$"},
                          "uniqueItems": True},
                "target": {
                    "type": "object",
                    "properties": {
                        "directory": {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": "^/"},
                        "name_prefix": {"type": "string", "minLength": 1, "maxLength": 64,
                                        "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"},
                        "format": {"enum": ["raw", "qcow2"]},
                        "keep_macs": {"type": "boolean"},
                        "start": {"type": "boolean"},
                        "rewrite_whole": {"type": "boolean"},
                        "read_back": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        }
    },
    "additionalProperties": False,
}

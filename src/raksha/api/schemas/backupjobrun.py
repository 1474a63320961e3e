"""Bodies of run requests: start (full, incremental, once), update, and restore of a run."""

from __future__ import annotations

START = {
    "type": "object",
    "properties": {
        "backupjobrun": {
            "type": "object",
            "properties": {"description": {"type": ["string", "null"], "maxLength": 1024}},
            "additionalProperties": False,
        }
    },
    "additionalProperties": False,
}

UPDATE = {
    "type": "object",
    "properties": {
        "backupjobrun": {
            "type": "object",
            "properties": {"description": {"type": ["string", "null"], "maxLength": 1024}},
            "required": ["description"],
            "additionalProperties": False,
        }
    },
    "required": ["backupjobrun"],
    "additionalProperties": False,
}

"""The OpenAPI 3.1 document of the whole API, built from the route table and the schemas.

``docs/api/openapi.json`` is this document checked in; a test keeps the two equal, and
another that every answer of the running app validates against it.
"""

from __future__ import annotations

import re
from typing import Any

from raksha.api.handlers import apidoc, backupjob, backupjobrun, restore, versions
from raksha.api.schemas import backupjob as job_schema
from raksha.api.schemas import backupjobrun as run_schema
from raksha.api.schemas import restore as restore_schema
from raksha.api.schemas import views
from raksha.api.urls import routes

ANY_OBJECT: dict[str, Any] = {"type": "object"}
COMPONENTS: dict[str, dict[str, Any]] = {
    "Error": views.ERROR,
    "Backupjob": views.BACKUPJOB,
    "Backupjobrun": views.BACKUPJOBRUN,
    "BackupjobrunPrepared": views.PREPARED_RUN,
    "Restore": views.RESTORE,
    "BackupjobCreate": job_schema.CREATE,
    "BackupjobUpdate": job_schema.UPDATE,
    "BackupjobrunStart": run_schema.START,
    "BackupjobrunUpdate": run_schema.UPDATE,
    "RestoreRequest": restore_schema.RESTORE,
}


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def one(key: str, name: str) -> dict[str, Any]:
    return {"type": "object", "required": [key], "properties": {key: ref(name)}}


def many(key: str, name: str) -> dict[str, Any]:
    return {"type": "object", "required": [key],
            "properties": {key: {"type": "array", "items": ref(name)}, f"{key}_links": views.LINKS}}


JOB, RUN, RESTORE = one("backupjob", "Backupjob"), one("backupjobrun", "Backupjobrun"), one("restore", "Restore")
# handler -> (summary, request body schema or None, body required, success status, response schema or None)
OPERATIONS: dict[Any, tuple[str, dict[str, Any] | None, bool, int, dict[str, Any] | None]] = {
    versions.index: ("API versions", None, False, 200, ANY_OBJECT),
    versions.v1: ("Version 1", None, False, 200, ANY_OBJECT),
    apidoc.document: ("This OpenAPI document", None, False, 200, ANY_OBJECT),
    backupjob.list_jobs: ("List backup jobs", None, False, 200, many("backupjobs", "Backupjob")),
    backupjob.create_job: ("Create a backup job", ref("BackupjobCreate"), True, 201, JOB),
    backupjob.show_job: ("Show a backup job", None, False, 200, JOB),
    backupjob.update_job: ("Update a backup job", ref("BackupjobUpdate"), True, 200, JOB),
    backupjob.delete_job: ("Delete a backup job", None, False, 204, None),
    backupjob.run_full: ("Run a full backup", ref("BackupjobrunStart"), False, 202, RUN),
    backupjob.run_incremental: ("Run an incremental backup", ref("BackupjobrunStart"), False, 202, RUN),
    backupjob.run_once: ("Run the job once (its policy picks full or incremental)", ref("BackupjobrunStart"),
                         False, 202, RUN),
    backupjobrun.list_runs: ("List runs", None, False, 200, many("backupjobruns", "Backupjobrun")),
    backupjobrun.show_run: ("Show a run", None, False, 200, RUN),
    backupjobrun.update_run: ("Update a run's description", ref("BackupjobrunUpdate"), True, 200, RUN),
    backupjobrun.delete_run: ("Delete a run (and vault data no other run needs)", None, False, 204, None),
    backupjobrun.cancel_run: ("Cancel a run", None, False, 202, RUN),
    backupjobrun.restore_run: ("Restore a run", ref("RestoreRequest"), False, 202, RESTORE),
    restore.list_restores: ("List restores", None, False, 200, many("restores", "Restore")),
    restore.show_restore: ("Show a restore", None, False, 200, RESTORE),
    restore.cancel_restore: ("Cancel a restore", None, False, 202, RESTORE),
}

_LIST_QUERY = {
    backupjob.list_jobs: backupjob.FILTERS,
    backupjobrun.list_runs: backupjobrun.FILTERS,
    restore.list_restores: restore.FILTERS,
}
_ERRORS = {"400": "Bad request body or query", "401": "No valid token", "403": "Not allowed (policy or project)",
           "404": "No such resource", "405": "Method not allowed", "409": "Conflict with the resource's state"}


def _op_id(method: str, path: str) -> str:
    words = re.sub(r"[{}]", "", path).strip("/").replace("/", "_").replace("-", "_") or "root"
    return f"{method.lower()}_{words}"


def build() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, handler in routes():
        summary, body, required, status, answer = OPERATIONS[handler]
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in re.findall(r"{(\w+)}", path)]
        if handler in _LIST_QUERY:
            params += [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                       {"name": "marker", "in": "query", "schema": {"type": "string"}}]
            params += [{"name": f, "in": "query", "schema": {"type": "string"}} for f in _LIST_QUERY[handler]]
        if handler is backupjob.run_once and path.endswith("{id}"):
            params.append({"name": "prepare", "in": "query", "schema": {"enum": list(backupjob.PREPARE)}})
            answer = {"type": "object", "required": ["backupjobrun"], "properties": {
                "backupjobrun": {"anyOf": [ref("Backupjobrun"), ref("BackupjobrunPrepared")]}}}
        responses: dict[str, Any] = {str(status): {"description": summary}}
        if answer is not None:
            responses[str(status)]["content"] = {"application/json": {"schema": answer}}
        if path.startswith("/v1/"):
            for code in _ERRORS:
                responses[code] = {"$ref": f"#/components/responses/E{code}"}
        op: dict[str, Any] = {"operationId": _op_id(method, path), "summary": summary, "responses": responses}
        if path.startswith("/v1/"):
            op["security"] = [{"keystone": []}, {}]  # a token in a cloud; none in the embedded mode
        if params:
            op["parameters"] = params
        if body is not None:
            op["requestBody"] = {"required": required, "content": {"application/json": {"schema": body}}}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Raksha API", "version": "1.0",
                 "description": "Data protection as a service for KVM clouds: the seed's v1 resources."},
        "paths": paths,
        "components": {
            "schemas": COMPONENTS,
            "responses": {f"E{code}": {"description": text, "content": {"application/json": {"schema": ref("Error")}}}
                          for code, text in _ERRORS.items()},
            "securitySchemes": {"keystone": {
                "type": "apiKey", "in": "header", "name": "X-Auth-Token",
                "description": "A Keystone token scoped to the path's tenant ([api] auth_strategy = keystone); "
                               "the embedded all-in-one (noauth) needs none."}},
        },
    }

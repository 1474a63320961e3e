"""Runs: ``v1/{tenant_id}/backupjobs/{id}/backupjobsruns[/{run_id}]`` and the top-level ``backupjobruns``."""

from __future__ import annotations

import webob

from raksha.api.app import ApiRequest, json_response
from raksha.api.handlers.common import page_args, page_links
from raksha.api.schemas import backupjobrun as schema
from raksha.api.schemas import restore as restore_schema
from raksha.api.validation import json_body

FILTERS = ("status", "type")


def list_runs(req: ApiRequest) -> webob.Response:
    req.authorize("backupjobrun:list")
    args = page_args(req, FILTERS)
    runs = req.service.list_runs(req.ctx, job_id=req.params.get("id"), **args)
    return json_response({"backupjobruns": runs, "backupjobruns_links": page_links(req, runs, args["limit"])})


def show_run(req: ApiRequest) -> webob.Response:
    req.authorize("backupjobrun:show")
    return json_response({"backupjobrun": req.service.get_run(req.ctx, req.params["run_id"],
                                                               job_id=req.params.get("id"))})


def update_run(req: ApiRequest) -> webob.Response:
    req.authorize("backupjobrun:update")
    body = json_body(req.http, schema.UPDATE)
    run = req.service.update_run(req.ctx, req.params["run_id"], job_id=req.params.get("id"),
                                 description=body["backupjobrun"]["description"])
    return json_response({"backupjobrun": run})


def delete_run(req: ApiRequest) -> webob.Response:
    req.authorize("backupjobrun:delete")
    req.service.delete_run(req.ctx, req.params["run_id"], job_id=req.params.get("id"))
    return webob.Response(status=204)


def cancel_run(req: ApiRequest) -> webob.Response:
    req.authorize("backupjobrun:cancel")
    return json_response({"backupjobrun": req.service.cancel_run(req.ctx, req.params["run_id"])}, status=202)


def restore_run(req: ApiRequest) -> webob.Response:
    """The seed's "restore from backup job run"; no body restores every VM as a new VM (the 2013 client)."""
    req.authorize("backupjobrun:restore")
    body = json_body(req.http, restore_schema.RESTORE, optional=True)
    restore = req.service.start_restore(req.ctx, req.params["run_id"], job_id=req.params.get("id"),
                                        spec=body.get("restore") or {})
    return json_response({"restore": restore}, status=202,
                         headers={"Location": f"{req.http.host_url}/v1/{req.tenant_id}/restores/{restore['id']}"})

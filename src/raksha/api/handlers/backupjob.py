"""``v1/{tenant_id}/backupjobs``: create, list, show, update, delete a job; run it full, incremental or once."""

from __future__ import annotations

import webob

from raksha.api.app import ApiRequest, json_response
from raksha.api.handlers.common import page_args, page_links
from raksha.api.schemas import backupjob as schema
from raksha.api.schemas import backupjobrun as run_schema
from raksha.api.validation import json_body
from raksha.domain.errors import InvalidInput

FILTERS = ("status", "name")
PREPARE = ("0", "1", "true", "false")  # ?prepare=1: the 2013 client's "only prepare the run"


def list_jobs(req: ApiRequest) -> webob.Response:
    req.authorize("backupjob:list")
    args = page_args(req, FILTERS)
    jobs = req.service.list_jobs(req.ctx, **args)
    return json_response({"backupjobs": jobs, "backupjobs_links": page_links(req, jobs, args["limit"])})


def show_job(req: ApiRequest) -> webob.Response:
    req.authorize("backupjob:show")
    return json_response({"backupjob": req.service.get_job(req.ctx, req.params["id"])})


def create_job(req: ApiRequest) -> webob.Response:
    req.authorize("backupjob:create")
    body = json_body(req.http, schema.CREATE)
    job = req.service.create_job(req.ctx, body["backupjob"])
    return json_response({"backupjob": job}, status=201, headers={"Location": f"{req.http.path_url}/{job['id']}"})


def update_job(req: ApiRequest) -> webob.Response:
    req.authorize("backupjob:update")
    body = json_body(req.http, schema.UPDATE)
    return json_response({"backupjob": req.service.update_job(req.ctx, req.params["id"], body["backupjob"])})


def delete_job(req: ApiRequest) -> webob.Response:
    req.authorize("backupjob:delete")
    req.service.delete_job(req.ctx, req.params["id"])
    return webob.Response(status=204)


def _start(req: ApiRequest, kind: str) -> webob.Response:
    req.authorize("backupjob:run")
    body = json_body(req.http, run_schema.START, optional=True)
    description = (body.get("backupjobrun") or {}).get("description")
    prepare = req.http.GET.get("prepare")
    if prepare not in (None, *PREPARE):
        raise InvalidInput(f"query parameter prepare must be one of {', '.join(PREPARE)}, not {prepare!r}",
                           code="QUERY_INVALID")
    prepare_only = prepare in ("1", "true")
    run = req.service.start_run(req.ctx, req.params["id"], kind, description=description, prepare_only=prepare_only)
    return json_response({"backupjobrun": run}, status=202)


def run_full(req: ApiRequest) -> webob.Response:
    return _start(req, "full")


def run_incremental(req: ApiRequest) -> webob.Response:
    return _start(req, "incremental")


def run_once(req: ApiRequest) -> webob.Response:
    """The job's policy decides full or incremental (the seed's "run backup job once")."""
    return _start(req, "auto")

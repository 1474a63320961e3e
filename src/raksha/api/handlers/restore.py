"""``v1/{tenant_id}/restores[/{id}]``: watch and cancel restores."""

from __future__ import annotations

import webob

from raksha.api.app import ApiRequest, json_response
from raksha.api.handlers.common import page_args, page_links

FILTERS = ("status", "type", "backupjobrun_id")


def list_restores(req: ApiRequest) -> webob.Response:
    req.authorize("restore:list")
    args = page_args(req, FILTERS)
    restores = req.service.list_restores(req.ctx, **args)
    return json_response({"restores": restores, "restores_links": page_links(req, restores, args["limit"])})


def show_restore(req: ApiRequest) -> webob.Response:
    req.authorize("restore:show")
    return json_response({"restore": req.service.get_restore(req.ctx, req.params["id"])})


def cancel_restore(req: ApiRequest) -> webob.Response:
    req.authorize("restore:cancel")
    return json_response({"restore": req.service.cancel_restore(req.ctx, req.params["id"])}, status=202)

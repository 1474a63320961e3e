"""The WSGI application: context, policy, dispatch and JSON errors around every handler."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import webob

from raksha.api import context, faults
from raksha.api.policies import Policy
from raksha.api.router import Router

LOG = logging.getLogger(__name__)
StartResponse = Callable[..., Any]


@dataclass
class ApiRequest:
    """What a handler gets: the HTTP request, who calls, the path's parameters and the service behind."""

    http: webob.Request
    ctx: context.RequestContext
    params: dict[str, str]
    service: Any
    policy: Policy

    def authorize(self, action: str) -> None:
        self.policy.authorize(self.ctx, action)

    @property
    def tenant_id(self) -> str:
        return self.params["tenant_id"]


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None) -> webob.Response:
    resp = webob.Response(status=status, content_type="application/json", charset="utf-8")
    resp.text = json.dumps(body, default=str)
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


class Application:
    def __init__(self, service: Any, *, auth_strategy: str = context.NOAUTH, policy: Policy | None = None) -> None:
        from raksha.api.urls import routes  # the handlers import this module's helpers

        self.service = service
        self.auth_strategy = auth_strategy
        self.policy = policy or Policy()
        self.router = Router(routes())

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        http = webob.Request(environ)
        request_id = "req-" + str(uuid.uuid4())
        started = time.monotonic()
        try:
            handler, params = self.router.match(http.method, http.path_info.rstrip("/") or "/")
            tenant = params.get("tenant_id")
            ctx = context.from_environ(environ, self.auth_strategy, tenant, request_id)
            if tenant is not None:
                ctx.require_project(tenant)
            resp = handler(ApiRequest(http, ctx, params, self.service, self.policy))
        except Exception as exc:  # every failure becomes a JSON error; tracebacks stay in the log
            resp = faults.from_exception(exc, request_id)
        resp.headers["X-Openstack-Request-Id"] = request_id
        LOG.info("%s %s %s %.1fms %s", http.method, http.path_qs, resp.status_int,
                 (time.monotonic() - started) * 1000, request_id)
        body: Iterable[bytes] = resp(environ, start_response)
        return body

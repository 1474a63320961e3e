"""Who is calling: the project (tenant), user and roles a request acts for.

In a cloud, keystonemiddleware's ``auth_token`` has validated the token and set
the ``X-Project-Id``/``X-User-Id``/``X-Roles`` headers. In the embedded
all-in-one mode there is no auth: the path's tenant is the caller. Either way
the caller's project must equal the ``{tenant_id}`` of the path, so no tenant
reaches another's resources.
"""

from __future__ import annotations

from typing import Any

from raksha.domain.context import RequestContext
from raksha.domain.errors import Unauthorized

NOAUTH, KEYSTONE = "noauth", "keystone"
__all__ = ["KEYSTONE", "NOAUTH", "RequestContext", "from_environ"]


def from_environ(environ: dict[str, Any], auth_strategy: str, tenant_id: str | None, request_id: str) -> RequestContext:
    if auth_strategy == KEYSTONE:
        if environ.get("HTTP_X_IDENTITY_STATUS") != "Confirmed":
            raise Unauthorized("a valid Keystone token is required (X-Auth-Token)", code="AUTH_REQUIRED")
        roles = tuple(r.strip().lower() for r in environ.get("HTTP_X_ROLES", "").split(",") if r.strip())
        return RequestContext(environ.get("HTTP_X_PROJECT_ID"), environ.get("HTTP_X_USER_ID"), roles, request_id)
    # Embedded: one operator, every tenant is theirs. The 2013 client's X-Auth-Project-Id is honoured.
    project = environ.get("HTTP_X_AUTH_PROJECT_ID") or tenant_id
    return RequestContext(project, environ.get("HTTP_X_USER_ID", "embedded"), ("admin", "member", "reader"),
                          request_id)

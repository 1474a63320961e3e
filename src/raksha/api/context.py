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
from raksha.domain.errors import Forbidden, Unauthorized

NOAUTH, KEYSTONE = "noauth", "keystone"
__all__ = ["KEYSTONE", "NOAUTH", "RequestContext", "from_environ"]


def from_environ(environ: dict[str, Any], auth_strategy: str, tenant_id: str | None, request_id: str) -> RequestContext:
    if auth_strategy == KEYSTONE:
        if environ.get("HTTP_X_IDENTITY_STATUS") != "Confirmed":
            if tenant_id is None:  # the versions and OpenAPI documents are public, as in any OpenStack API
                return RequestContext(None, None, (), request_id)
            raise Unauthorized("a valid Keystone token is required (X-Auth-Token)", code="AUTH_REQUIRED")
        roles = tuple(r.strip().lower() for r in environ.get("HTTP_X_ROLES", "").split(",") if r.strip())
        project = environ.get("HTTP_X_PROJECT_ID")
        # The 2013 client also names its project (id or name) in X-Auth-Project-Id: it must be the token's.
        claimed = environ.get("HTTP_X_AUTH_PROJECT_ID")
        if claimed and claimed not in (project, environ.get("HTTP_X_PROJECT_NAME")):
            raise Forbidden(f"X-Auth-Project-Id {claimed!r} is not the token's project {project!r}",
                            code="PROJECT_MISMATCH")
        return RequestContext(project, environ.get("HTTP_X_USER_ID"), roles, request_id)
    # Embedded: one operator, every tenant is theirs. The 2013 client's X-Auth-Project-Id is honoured.
    project = environ.get("HTTP_X_AUTH_PROJECT_ID") or tenant_id
    return RequestContext(project, environ.get("HTTP_X_USER_ID", "embedded"), ("admin", "member", "reader"),
                          request_id)

"""Who a request acts for: the project (tenant), user and roles. Pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raksha.domain.errors import Forbidden


@dataclass(frozen=True)
class RequestContext:
    project_id: str | None
    user_id: str | None
    roles: tuple[str, ...] = ()
    request_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def policy_creds(self) -> dict[str, Any]:
        return {"project_id": self.project_id, "user_id": self.user_id, "roles": list(self.roles)}

    def require_project(self, tenant_id: str) -> None:
        """The caller's project must be the path's tenant: no tenant reaches another's resources."""
        if self.project_id != tenant_id:
            raise Forbidden(f"project {self.project_id!r} may not act for tenant {tenant_id!r}",
                            code="PROJECT_MISMATCH")

"""Policy defaults (oslo.policy): readers look, members act, admins too; a policy file may override any rule.

Scope is checked apart from these rules: the caller's project must equal the path's tenant
(see :mod:`raksha.api.context`), so a rule here never widens access across tenants.
"""

from __future__ import annotations

from oslo_config import cfg
from oslo_policy import policy

from raksha.domain.context import RequestContext
from raksha.domain.errors import Forbidden

READER = "role:reader or role:member or role:admin"
MEMBER = "role:member or role:admin"

_RULES = [
    ("backupjob:list", READER, "List backup jobs", [("GET", "/v1/{tenant_id}/backupjobs")]),
    ("backupjob:show", READER, "Show a backup job", [("GET", "/v1/{tenant_id}/backupjobs/{id}")]),
    ("backupjob:create", MEMBER, "Create a backup job", [("POST", "/v1/{tenant_id}/backupjobs")]),
    ("backupjob:update", MEMBER, "Update a backup job", [("PUT", "/v1/{tenant_id}/backupjobs/{id}")]),
    ("backupjob:delete", MEMBER, "Delete a backup job", [("DELETE", "/v1/{tenant_id}/backupjobs/{id}")]),
    ("backupjob:run", MEMBER, "Run a backup job (full, incremental or once)",
     [("POST", "/v1/{tenant_id}/backupjobs/{id}/full"), ("POST", "/v1/{tenant_id}/backupjobs/{id}/incremental"),
      ("POST", "/v1/{tenant_id}/backupjobs/{id}/backupjobsruns")]),
    ("backupjobrun:list", READER, "List runs", [("GET", "/v1/{tenant_id}/backupjobs/{id}/backupjobsruns")]),
    ("backupjobrun:show", READER, "Show a run", [("GET", "/v1/{tenant_id}/backupjobs/{id}/backupjobsruns/{run_id}")]),
    ("backupjobrun:update", MEMBER, "Update a run's description",
     [("PUT", "/v1/{tenant_id}/backupjobs/{id}/backupjobsruns/{run_id}")]),
    ("backupjobrun:delete", MEMBER, "Delete a run and the vault data no other run needs",
     [("DELETE", "/v1/{tenant_id}/backupjobs/{id}/backupjobsruns/{run_id}")]),
    ("backupjobrun:cancel", MEMBER, "Cancel a run", [("POST", "/v1/{tenant_id}/backupjobruns/{run_id}/cancel")]),
    ("backupjobrun:restore", MEMBER, "Restore a run",
     [("POST", "/v1/{tenant_id}/backupjobs/{id}/backupjobsruns/{run_id}")]),
    ("restore:list", READER, "List restores", [("GET", "/v1/{tenant_id}/restores")]),
    ("restore:show", READER, "Show a restore", [("GET", "/v1/{tenant_id}/restores/{id}")]),
    ("restore:cancel", MEMBER, "Cancel a restore", [("POST", "/v1/{tenant_id}/restores/{id}/cancel")]),
]


def rules() -> list[policy.DocumentedRuleDefault]:
    return [policy.DocumentedRuleDefault(name=f"raksha:{name}", check_str=check, description=desc,
                                         operations=[{"method": m, "path": p} for m, p in ops])
            for name, check, desc, ops in _RULES]


class Policy:
    def __init__(self, conf: cfg.ConfigOpts | None = None, policy_file: str | None = None) -> None:
        if conf is None:
            conf = cfg.ConfigOpts()
            conf([])
        # A missing policy file is fine: the defaults below apply.
        self._enforcer = policy.Enforcer(conf, policy_file=policy_file)
        self._enforcer.register_defaults(rules())

    def authorize(self, ctx: RequestContext, action: str, target: dict[str, object] | None = None) -> None:
        name = f"raksha:{action}"
        creds = ctx.policy_creds()
        if not self._enforcer.enforce(name, target or {"project_id": ctx.project_id}, creds):
            raise Forbidden(f"policy does not allow {name} for roles {sorted(ctx.roles)}", code="POLICY_DENIED")

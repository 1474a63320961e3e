"""The queries the API and the services need, every one scoped to a project.

Every function takes a ``Session`` (``with db.begin() as session:``, raksha.db.Database)
and, except the system queries, the caller's ``project_id``: a row of another project
is reported exactly like a missing one (``*_NOT_FOUND``). Rows are soft-deleted. Statuses
change only through the ``transition_*`` functions, which check the move against
raksha.domain.states and apply it by compare-and-set on the old status. Objects come
back with what callers read loaded (a job's VMs; a run's VMs, resources and backups).
Lists take ``limit`` (default 100, at most 1000), ``marker`` (the last id of the
previous page) or ``offset``, and ``sort_dir`` (``desc``: newest first, the default).
``purge_deleted`` (``raksha db purge``) takes the ``Database``: it removes soft-deleted rows in batches,
one transaction each.
"""

from raksha.db.api.jobs import VmSpec, create_job, delete_job, get_job, list_jobs, update_job
from raksha.db.api.purge import plan_purge, purge_deleted
from raksha.db.api.restores import (
    create_restore,
    delete_restore,
    get_restore,
    list_restores,
    transition_restore,
    update_restore,
)
from raksha.db.api.runs import (
    active_runs,
    add_run_vm,
    add_run_vm_resource,
    add_vm_resource_backup,
    create_run,
    deletable_backups,
    get_run,
    last_runs,
    latest_run,
    list_runs,
    orphaned_backups,
    referenced_backup_ids,
    settle_run,
    transition_run,
    transition_run_vm,
    transition_run_vm_resource,
    transition_vm_resource_backup,
    update_run,
    update_run_vm,
    update_run_vm_resource,
    update_vm_resource_backup,
)
from raksha.db.api.system import (
    all_vault_services,
    due_jobs,
    record_verification,
    unfinished_restores,
    unfinished_runs,
)
from raksha.db.api.vaults import (
    create_vault_service,
    delete_vault_service,
    get_vault_service,
    list_vault_services,
    update_vault_service,
)

__all__ = [
    "VmSpec",
    "active_runs",
    "add_run_vm",
    "add_run_vm_resource",
    "add_vm_resource_backup",
    "all_vault_services",
    "create_job",
    "create_restore",
    "create_run",
    "create_vault_service",
    "deletable_backups",
    "delete_job",
    "delete_restore",
    "delete_vault_service",
    "due_jobs",
    "get_job",
    "get_restore",
    "get_run",
    "get_vault_service",
    "last_runs",
    "latest_run",
    "list_jobs",
    "list_restores",
    "list_runs",
    "list_vault_services",
    "orphaned_backups",
    "plan_purge",
    "purge_deleted",
    "record_verification",
    "referenced_backup_ids",
    "settle_run",
    "transition_restore",
    "transition_run",
    "transition_run_vm",
    "transition_run_vm_resource",
    "transition_vm_resource_backup",
    "unfinished_restores",
    "unfinished_runs",
    "update_job",
    "update_restore",
    "update_run",
    "update_run_vm",
    "update_run_vm_resource",
    "update_vault_service",
    "update_vm_resource_backup",
]

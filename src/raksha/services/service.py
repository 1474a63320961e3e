"""What the API asks of the service: jobs, runs and restores, scoped to the caller's project.

Long work (runs, restores) is cast to the orchestrator; the caller gets the new resource at
once (202) and watches its status and progress.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from raksha.db import Database
from raksha.db import api as db
from raksha.db.types import utcnow
from raksha.domain.context import RequestContext
from raksha.domain.errors import Conflict, InvalidInput, NotFound
from raksha.domain.states import RESTORE, RUN, RunStatus
from raksha.rpc.inproc import InProcessTransport
from raksha.services import schedule, views
from raksha.services.agent import LibvirtAgent

#: The longest project id the database keeps (its column; Keystone's are 32 or 64 characters).
MAX_PROJECT_ID = 255
T = TypeVar("T")


def _project(ctx: RequestContext) -> str:
    assert ctx.project_id is not None  # the API checked it equals the path's tenant
    if len(ctx.project_id) > MAX_PROJECT_ID:
        raise InvalidInput(f"a project id is at most {MAX_PROJECT_ID} characters", code="PROJECT_ID_INVALID")
    return ctx.project_id


def _no_nul(value: Any, where: str) -> None:
    """Text with a NUL character is refused on every backend alike (PostgreSQL cannot store one)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidInput(f"{where or 'a value'} contains a NUL character", code="VALUE_INVALID",
                               field=where or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_nul(key, where)
            _no_nul(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for item in value:
            _no_nul(item, where)


def _checked(method: Callable[..., T]) -> Callable[..., T]:
    """The same answer from every database backend: the caller's project and every id, filter and body
    value checked before any query (PostgreSQL refuses what SQLite would store)."""

    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self: Any, ctx: RequestContext, *args: Any, **kwargs: Any) -> T:
        _project(ctx)
        for name, arg in signature.bind(self, ctx, *args, **kwargs).arguments.items():
            if name not in ("self", "ctx"):
                _no_nul(arg, "" if name in ("spec", "filters") else name)  # a body's or query's own names
        return method(self, ctx, *args, **kwargs)

    return wrapper


def _base(ctx: RequestContext) -> str:
    return f"/v1/{ctx.project_id}"


class Service:
    def __init__(self, database: Database, transport: InProcessTransport, agent: LibvirtAgent) -> None:
        self.db = database
        self.rpc = transport
        self.agent = agent

    # -- jobs --------------------------------------------------------------------------------------

    def _job_views(self, s: Any, jobs: list[Any], ctx: RequestContext) -> list[dict[str, Any]]:
        """The jobs as the API shows them, each with its newest run: one query for all their last runs."""
        last = db.last_runs(s, _project(ctx), [job.id for job in jobs])
        return [views.job_view(job, _base(ctx), last_run=last.get(job.id)) for job in jobs]

    def _job_view(self, s: Any, job: Any, ctx: RequestContext) -> dict[str, Any]:
        return self._job_views(s, [job], ctx)[0]

    def _job_fields(self, s: Any, ctx: RequestContext, spec: dict[str, Any], *, creating: bool) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for key in ("name", "description", "consistency"):
            if key in spec:
                fields[key] = spec[key]
        vms = spec.get("vms")
        if vms is not None and spec.get("instance_id"):
            raise InvalidInput("give vms or the 2013 client's instance_id, not both", code="BODY_INVALID",
                               field="vms")
        if vms is None and spec.get("instance_id"):
            vms = [{"id": spec["instance_id"]}]
        if vms is None and creating:
            raise InvalidInput("a backup job needs vms: [{\"id\": <domain name or UUID>}, ...]",
                               code="BODY_INVALID", field="vms")
        if vms is not None:
            for vm in vms:
                try:
                    self.agent.describe_vm(vm["id"])  # now rather than at the first run
                except NotFound as exc:
                    raise InvalidInput(exc.message, code=exc.code, vm=vm["id"]) from None
            fields["vms"] = [vm["id"] for vm in vms]
            fields["excluded_disks"] = {vm["id"]: vm["exclude_disks"] for vm in vms if vm.get("exclude_disks")} or None
        if spec.get("vault_service"):
            fields["vault_service_id"] = self._vault_id(s, ctx, spec["vault_service"])
        sched = dict(spec.get("schedule") or {})
        if spec.get("hours"):
            sched.setdefault("interval_hours", spec["hours"])
        if "schedule" in spec or "hours" in spec:
            fields.update(schedule.columns(sched, utcnow()))
        if "retention" in spec:
            fields["retention"] = spec["retention"] or None
        if creating and "name" not in fields:
            raise InvalidInput("a backup job needs a name", code="BODY_INVALID", field="name")
        return fields

    def _vault_id(self, s: Any, ctx: RequestContext, ref: str) -> str:
        for row in db.list_vault_services(s, _project(ctx), limit=1000):
            if ref in (row.id, row.name):
                return str(row.id)
        raise InvalidInput(f"no vault service {ref!r}", code="VAULT_SERVICE_NOT_FOUND")

    @_checked
    def list_jobs(self, ctx: RequestContext, *, limit: int, marker: str | None,
                  filters: dict[str, Any]) -> list[dict[str, Any]]:
        with self.db.begin() as s:
            return self._job_views(s, db.list_jobs(s, _project(ctx), limit=limit, marker=marker, **filters), ctx)

    @_checked
    def get_job(self, ctx: RequestContext, job_id: str) -> dict[str, Any]:
        with self.db.begin() as s:
            return self._job_view(s, db.get_job(s, _project(ctx), job_id), ctx)

    @_checked
    def create_job(self, ctx: RequestContext, spec: dict[str, Any]) -> dict[str, Any]:
        with self.db.begin() as s:
            fields = self._job_fields(s, ctx, spec, creating=True)
            job = db.create_job(s, _project(ctx), ctx.user_id or "", **fields)
            return self._job_view(s, job, ctx)

    @_checked
    def update_job(self, ctx: RequestContext, job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        with self.db.begin() as s:
            db.get_job(s, _project(ctx), job_id)
            job = db.update_job(s, _project(ctx), job_id, **self._job_fields(s, ctx, spec, creating=False))
            return self._job_view(s, job, ctx)

    @_checked
    def delete_job(self, ctx: RequestContext, job_id: str) -> None:
        with self.db.begin() as s:
            db.delete_job(s, _project(ctx), job_id)

    # -- runs --------------------------------------------------------------------------------------

    @_checked
    def start_run(self, ctx: RequestContext, job_id: str, kind: str, *, description: str | None = None,
                  prepare_only: bool = False) -> dict[str, Any]:
        project = _project(ctx)
        with self.db.begin() as s:
            job = db.get_job(s, project, job_id)
            parent = db.latest_run(s, project, job_id)
            backuptype = schedule.choose_type(kind, job, parent is not None)
            if prepare_only:
                for vm in job.vms:
                    self.agent.describe_vm(vm.vm_id)
                return {"id": None, "backupjob_id": job.id, "type": backuptype, "status": "prepared",
                        "vms": [{"vm_id": vm.vm_id} for vm in job.vms]}
            if backuptype == "incremental" and parent is None:  # nothing to build on: say so, run full
                backuptype = "full"
                description = (description or "") + " (no earlier run to build on: full)"
            run = db.create_run(s, project, ctx.user_id or "", job_id, backuptype=backuptype, description=description,
                                parent_run_id=parent.id if backuptype == "incremental" and parent else None)
            view = views.run_view(run, _base(ctx))
        self.rpc.cast("orchestrator", "run_backup", project_id=project, run_id=run.id)
        return view

    @_checked
    def list_runs(self, ctx: RequestContext, *, job_id: str | None, limit: int, marker: str | None,
                  filters: dict[str, Any]) -> list[dict[str, Any]]:
        f: dict[str, Any] = dict(filters)
        if "type" in f:
            f["backuptype"] = f.pop("type")
        with self.db.begin() as s:
            runs = db.list_runs(s, _project(ctx), job_id=job_id, limit=limit, marker=marker, details=True, **f)
            return [views.run_view(r, _base(ctx)) for r in runs]

    @_checked
    def get_run(self, ctx: RequestContext, run_id: str, *, job_id: str | None = None) -> dict[str, Any]:
        with self.db.begin() as s:
            return views.run_view(db.get_run(s, _project(ctx), run_id, job_id=job_id), _base(ctx))

    @_checked
    def update_run(self, ctx: RequestContext, run_id: str, *, job_id: str | None, description: str | None,
                   ) -> dict[str, Any]:
        with self.db.begin() as s:
            db.get_run(s, _project(ctx), run_id, job_id=job_id)
            return views.run_view(db.update_run(s, _project(ctx), run_id, description=description), _base(ctx))

    @_checked
    def delete_run(self, ctx: RequestContext, run_id: str, *, job_id: str | None = None) -> None:
        project = _project(ctx)
        with self.db.begin() as s:
            run = db.get_run(s, project, run_id, job_id=job_id)
            if not RUN.is_terminal(run.status) and run.status != RunStatus.DELETING:
                raise Conflict(f"run {run.id} is {run.status}; cancel it or wait for it to end before deleting",
                               code="RUN_IN_PROGRESS", id=run.id, status=run.status)
        self.rpc.call("orchestrator", "delete_run", project_id=project, run_id=run_id)

    @_checked
    def cancel_run(self, ctx: RequestContext, run_id: str) -> dict[str, Any]:
        project = _project(ctx)
        with self.db.begin() as s:
            run = db.get_run(s, project, run_id)
            if RUN.is_terminal(run.status):
                raise Conflict(f"run {run.id} is already {run.status}", code="RUN_FINISHED", id=run.id)
            target = RunStatus.CANCELLED if run.status == RunStatus.QUEUED else RunStatus.CANCELLING
            if target == RunStatus.CANCELLED:
                for vm in run.vms:
                    db.transition_run_vm(s, project, vm.id, "cancelled")
            run = db.transition_run(s, project, run_id, target, expected=run.status)
            view = views.run_view(run, _base(ctx))
        self.rpc.call("orchestrator", "request_cancel", resource_id=run_id)
        return view

    # -- restores ----------------------------------------------------------------------------------

    @_checked
    def start_restore(self, ctx: RequestContext, run_id: str, *, job_id: str | None,
                      spec: dict[str, Any]) -> dict[str, Any]:
        project = _project(ctx)
        selection = {k: spec[k] for k in ("vms", "disks") if spec.get(k)} or None
        with self.db.begin() as s:
            run = db.get_run(s, project, run_id, job_id=job_id)
            r = db.create_restore(s, project, ctx.user_id or "", run.id, restore_type=spec.get("type", "new_vm"),
                                  selection=selection, target=spec.get("target") or None,
                                  description=spec.get("description"))
            view = views.restore_view(r, _base(ctx), job_id=run.backupjob_id)
        self.rpc.cast("orchestrator", "run_restore", project_id=project, restore_id=r.id)
        return view

    def _restore_view(self, s: Any, ctx: RequestContext, r: Any) -> dict[str, Any]:
        try:
            job_id = db.get_run(s, _project(ctx), r.backupjobrun_id).backupjob_id
        except NotFound:
            job_id = None  # the run was deleted since
        return views.restore_view(r, _base(ctx), job_id=job_id)

    @_checked
    def list_restores(self, ctx: RequestContext, *, limit: int, marker: str | None,
                      filters: dict[str, Any]) -> list[dict[str, Any]]:
        f: dict[str, Any] = dict(filters)
        if "type" in f:
            f["restore_type"] = f.pop("type")
        if "backupjobrun_id" in f:
            f["run_id"] = f.pop("backupjobrun_id")
        with self.db.begin() as s:
            return [self._restore_view(s, ctx, r)
                    for r in db.list_restores(s, _project(ctx), limit=limit, marker=marker, **f)]

    @_checked
    def get_restore(self, ctx: RequestContext, restore_id: str) -> dict[str, Any]:
        with self.db.begin() as s:
            return self._restore_view(s, ctx, db.get_restore(s, _project(ctx), restore_id))

    @_checked
    def cancel_restore(self, ctx: RequestContext, restore_id: str) -> dict[str, Any]:
        project = _project(ctx)
        with self.db.begin() as s:
            r = db.get_restore(s, project, restore_id)
            if RESTORE.is_terminal(r.status):
                raise Conflict(f"restore {r.id} is already {r.status}", code="RESTORE_FINISHED", id=r.id)
            target = "cancelled" if r.status == "queued" else "cancelling"
            r = db.transition_restore(s, project, restore_id, target, expected=r.status)
            view = self._restore_view(s, ctx, r)
        self.rpc.call("orchestrator", "request_cancel", resource_id=restore_id)
        return view

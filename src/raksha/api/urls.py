"""Every route of the API, in one table. Order matters: literal segments (``detail``) before ``{id}``."""

from __future__ import annotations

from raksha.api.handlers import apidoc, backupjob, backupjobrun, restore, versions
from raksha.api.router import Handler

T = "/v1/{tenant_id}"
# The seed's table spells the nested collection "backupjobsruns"; the 2013 client says "backupjobruns".
RUN_SPELLINGS = ("backupjobsruns", "backupjobruns")


def routes() -> list[tuple[str, str, Handler]]:
    table: list[tuple[str, str, Handler]] = [
        ("GET", "/", versions.index),
        ("GET", "/v1", versions.v1),
        ("GET", "/openapi.json", apidoc.document),
        ("GET", f"{T}/backupjobs", backupjob.list_jobs),
        ("POST", f"{T}/backupjobs", backupjob.create_job),
        ("GET", f"{T}/backupjobs/detail", backupjob.list_jobs),
        ("GET", f"{T}/backupjobs/{{id}}", backupjob.show_job),
        ("PUT", f"{T}/backupjobs/{{id}}", backupjob.update_job),
        ("DELETE", f"{T}/backupjobs/{{id}}", backupjob.delete_job),
        ("POST", f"{T}/backupjobs/{{id}}", backupjob.run_once),  # the 2013 client's "run" (?prepare=1)
        ("POST", f"{T}/backupjobs/{{id}}/full", backupjob.run_full),
        ("POST", f"{T}/backupjobs/{{id}}/incremental", backupjob.run_incremental),
    ]
    for runs in RUN_SPELLINGS:
        nested = f"{T}/backupjobs/{{id}}/{runs}"
        table += [
            ("GET", nested, backupjobrun.list_runs),
            ("POST", nested, backupjob.run_once),
            ("GET", f"{nested}/{{run_id}}", backupjobrun.show_run),
            ("PUT", f"{nested}/{{run_id}}", backupjobrun.update_run),
            ("DELETE", f"{nested}/{{run_id}}", backupjobrun.delete_run),
            ("POST", f"{nested}/{{run_id}}", backupjobrun.restore_run),
            ("POST", f"{nested}/{{run_id}}/cancel", backupjobrun.cancel_run),
        ]
        top = f"{T}/{runs}"
        table += [
            ("GET", top, backupjobrun.list_runs),
            ("GET", f"{top}/detail", backupjobrun.list_runs),
            ("GET", f"{top}/{{run_id}}", backupjobrun.show_run),
            ("PUT", f"{top}/{{run_id}}", backupjobrun.update_run),
            ("DELETE", f"{top}/{{run_id}}", backupjobrun.delete_run),
            ("POST", f"{top}/{{run_id}}", backupjobrun.restore_run),
            ("POST", f"{top}/{{run_id}}/cancel", backupjobrun.cancel_run),
        ]
    table += [
        ("GET", f"{T}/restores", restore.list_restores),
        ("GET", f"{T}/restores/detail", restore.list_restores),
        ("GET", f"{T}/restores/{{id}}", restore.show_restore),
        ("POST", f"{T}/restores/{{id}}/cancel", restore.cancel_restore),
    ]
    return table

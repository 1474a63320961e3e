"""``openstack raksha ...``: Raksha as an OpenStack client (osc-lib) plugin, installed with the ``osc`` extra.

Commands live under ``raksha`` so they never clash with Cinder's ``openstack volume backup``:
``raksha job list|show|create|delete|run|full|incremental``, ``raksha run list|show|delete|cancel``,
``raksha restore create|list|show|cancel``. Like the ``raksha`` CLI they talk only to the API
(raksha.cli.client.ApiClient). The API is found by ``--os-raksha-url`` ($OS_RAKSHA_URL), else the
catalog's ``data-protection`` endpoint (or the endpoint of ``--os-auth-type token_endpoint`` / ``none``);
the project is the token's, else ``--os-raksha-project`` ($OS_RAKSHA_PROJECT, $OS_PROJECT_ID).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from typing import Any

from osc_lib import exceptions
from osc_lib.command import command

from raksha.cli.client import RESTORE_END, RUN_END, ApiClient, job_body, restore_body
from raksha.domain.errors import RakshaError
from raksha.domain.states import Consistency

# -- the plugin interface (openstack.cli.extension) -----------------------------------------------------

API_NAME = "raksha"
API_VERSION_OPTION = "os_raksha_api_version"
API_VERSIONS = {"1": "raksha.cli.client.ApiClient"}
DEFAULT_API_VERSION = "1"
SERVICE_TYPE = "data-protection"


def make_client(instance: Any) -> ApiClient:
    """The API client for OSC's ClientManager ``instance``: its URL, project and token."""
    config = instance.get_configuration()
    url = config.get("raksha_url")
    auth_type = config.get("auth_type")
    token = project = None
    if auth_type not in (None, "none"):
        auth_ref = instance.auth_ref  # authenticates (password, token...) unless it is an admin token
        if auth_ref is not None:
            token, project = auth_ref.auth_token, auth_ref.project_id
        elif instance.auth is not None:
            token = instance.auth.get_token(instance.session)
    if not url:
        url = instance.get_endpoint_for_service_type(SERVICE_TYPE, region_name=instance.region_name,
                                                     interface=instance.interface)
    if not url:
        raise exceptions.CommandError(f"no Raksha API: give --os-raksha-url or register a {SERVICE_TYPE!r} "
                                      "endpoint in the catalog")
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    # --os-cacert / --insecure (OS_CACERT, OS_INSECURE), as osc-lib resolved them for every client.
    return ApiClient(url, project or config.get("raksha_project"), token, verify=instance.verify)


def build_option_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--os-raksha-url", metavar="<url>", default=os.environ.get("OS_RAKSHA_URL"),
                        help="Raksha API URL (env OS_RAKSHA_URL; default: the catalog's data-protection endpoint)")
    parser.add_argument("--os-raksha-project", metavar="<project-id>",
                        default=os.environ.get("OS_RAKSHA_PROJECT") or os.environ.get("OS_PROJECT_ID"),
                        help="project (tenant) id when the token names none (env OS_RAKSHA_PROJECT)")
    parser.add_argument("--os-raksha-api-version", metavar="<version>",
                        default=os.environ.get("OS_RAKSHA_API_VERSION", DEFAULT_API_VERSION),
                        help="Raksha API version (only 1)")
    return parser


# -- helpers ----------------------------------------------------------------------------------------------


def _call(take: Any) -> Any:
    """Run an API call; its error (code and message) becomes the command's error."""
    try:
        return take()
    except RakshaError as exc:
        raise exceptions.CommandError(f"{exc.code}: {exc.message}") from None


def _client(cmd: command.Command) -> ApiClient:
    client: ApiClient = getattr(cmd.app.client_manager, API_NAME)  # made by make_client on first use
    return client


def _wait(client: ApiClient, path: str, key: str, terminal: tuple[str, ...]) -> dict[str, Any]:
    res: dict[str, Any] = _call(lambda: client.wait(path, key, terminal))
    return res


def _show(resource: dict[str, Any], fields: Iterable[str]) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    names = tuple(fields)
    return names, tuple(_cell(resource.get(f)) for f in names)


def _cell(value: Any) -> Any:
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return value


JOB_FIELDS = ("id", "name", "description", "status", "vms", "schedule", "retention", "consistency", "vault_service",
              "last_run", "created_at")
RUN_FIELDS = ("id", "backupjob_id", "type", "status", "progress_percent", "bytes_done", "bytes_total",
              "consistency", "freeze_ms", "size", "parent_run_id", "fail_reason", "created_at", "started_at",
              "finished_at", "verify_state", "verified_at", "verify_note", "vms")
RESTORE_FIELDS = ("id", "backupjobrun_id", "backupjob_id", "type", "status", "progress_percent", "bytes_done",
                  "bytes_total", "target", "results", "fail_reason", "created_at", "finished_at")


# -- jobs --------------------------------------------------------------------------------------------------


class ListJob(command.Lister):
    """List backup jobs"""

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        client = _client(self)
        jobs = _call(lambda: client.get("/backupjobs"))["backupjobs"]
        columns = ("ID", "Name", "Status", "VMs", "Last Run")
        return columns, [(j["id"], j["name"], j["status"], ", ".join(vm["id"] for vm in j["vms"]),
                          (j.get("last_run") or {}).get("status", "")) for j in jobs]


class ShowJob(command.ShowOne):
    """Show a backup job"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("job", metavar="<job>", help="backup job id")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        client = _client(self)
        return _show(_call(lambda: client.get(f"/backupjobs/{parsed_args.job}"))["backupjob"], JOB_FIELDS)


class CreateJob(command.ShowOne):
    """Create a backup job over VMs (libvirt domain names or UUIDs, Nova instance ids)"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("name", metavar="<name>")
        parser.add_argument("--vm", action="append", required=True, metavar="<vm>", help="a VM (repeat)")
        parser.add_argument("--description", metavar="<text>")
        parser.add_argument("--vault-service", metavar="<vault>")
        parser.add_argument("--interval-hours", type=float, metavar="<hours>")
        parser.add_argument("--cron", metavar="<expr>", help="cron expression (UTC)")
        parser.add_argument("--full-every", type=int, metavar="<n>", help="every n-th run full")
        for keep in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
            parser.add_argument(f"--keep-{keep}", type=int, metavar="<n>")
        parser.add_argument("--consistency", choices=[level.value for level in Consistency],
                            help="level wanted (default: the best each VM reaches)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        a = parsed_args
        body = job_body(a.name, a.vm, description=a.description, vault_service=a.vault_service,
                        interval_hours=a.interval_hours, cron=a.cron, full_every=a.full_every,
                        consistency=a.consistency,
                        keep={f"keep_{k}": getattr(a, f"keep_{k}")
                              for k in ("last", "hourly", "daily", "weekly", "monthly", "yearly")})
        client = _client(self)
        return _show(_call(lambda: client.post("/backupjobs", {"backupjob": body}))["backupjob"], JOB_FIELDS)


class DeleteJob(command.Command):
    """Delete backup job(s)"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("jobs", metavar="<job>", nargs="+")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> None:
        client = _client(self)
        for job in parsed_args.jobs:
            _call(lambda job=job: client.delete(f"/backupjobs/{job}"))


class _StartRun(command.ShowOne):
    path = ""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("job", metavar="<job>")
        parser.add_argument("--description", metavar="<text>")
        parser.add_argument("--wait", action="store_true", help="wait for the run to end")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        client = _client(self)
        body = {"backupjobrun": {"description": parsed_args.description}} if parsed_args.description else None
        run = _call(lambda: client.post(f"/backupjobs/{parsed_args.job}{self.path}", body))["backupjobrun"]
        if parsed_args.wait:
            run = _wait(client, f"/backupjobruns/{run['id']}", "backupjobrun", RUN_END)
            if run["status"] not in ("available", "partial"):
                raise exceptions.CommandError(f"run {run['id']} ended {run['status']}: {run.get('fail_reason')}")
        return _show(run, RUN_FIELDS)


class RunJob(_StartRun):
    """Run a backup job once (full or incremental by its policy)"""

    path = "/backupjobsruns"


class FullJob(_StartRun):
    """Run a full backup of a job"""

    path = "/full"


class IncrementalJob(_StartRun):
    """Run an incremental backup of a job"""

    path = "/incremental"


# -- runs --------------------------------------------------------------------------------------------------


class ListRun(command.Lister):
    """List backup runs"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("--job", metavar="<job>", help="only this job's runs")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        client = _client(self)
        path = f"/backupjobs/{parsed_args.job}/backupjobsruns" if parsed_args.job else "/backupjobruns"
        runs = _call(lambda: client.get(path))["backupjobruns"]
        columns = ("ID", "Job", "Type", "Status", "Consistency", "Size", "Created At")
        return columns, [(r["id"], r["backupjob_id"], r["type"], r["status"], r.get("consistency") or "",
                          r["size"], r["created_at"]) for r in runs]


class ShowRun(command.ShowOne):
    """Show a backup run (per VM and disk)"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("run", metavar="<run>")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        client = _client(self)
        return _show(_call(lambda: client.get(f"/backupjobruns/{parsed_args.run}"))["backupjobrun"], RUN_FIELDS)


class DeleteRun(command.Command):
    """Delete backup run(s) (their vault data that no other run needs)"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("runs", metavar="<run>", nargs="+")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> None:
        client = _client(self)
        for run in parsed_args.runs:
            _call(lambda run=run: client.delete(f"/backupjobruns/{run}"))


class CancelRun(command.ShowOne):
    """Cancel a backup run in progress"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("run", metavar="<run>")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        client = _client(self)
        run = _call(lambda: client.post(f"/backupjobruns/{parsed_args.run}/cancel"))["backupjobrun"]
        return _show(run, RUN_FIELDS)


# -- restores ----------------------------------------------------------------------------------------------


class CreateRestore(command.ShowOne):
    """Restore a backup run: new VMs, image files, or in place"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("run", metavar="<run>")
        parser.add_argument("--type", choices=["new_vm", "files", "in_place"], default="new_vm")
        parser.add_argument("--vm", action="append", metavar="<vm>", help="only this VM (repeat)")
        parser.add_argument("--disk", action="append", metavar="<disk>", help="only this disk target (repeat)")
        parser.add_argument("--directory", metavar="<dir>", help="where files (or new VMs' disks) go")
        parser.add_argument("--name-prefix", metavar="<prefix>", help="new VMs' name prefix")
        parser.add_argument("--disk-format", choices=["raw", "qcow2"], help="image format of restored disks")
        parser.add_argument("--no-start", action="store_true", help="do not start new VMs")
        parser.add_argument("--rewrite-whole", action="store_true",
                            help="in_place: write every disk whole, not only the chunks that differ")
        parser.add_argument("--read-back", action="store_true",
                            help="read every restored disk back and compare it with its backup")
        parser.add_argument("--wait", action="store_true", help="wait for the restore to end")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        a = parsed_args
        spec = restore_body(a.type, vms=a.vm, disks=a.disk, directory=a.directory, name_prefix=a.name_prefix,
                            fmt=a.disk_format, start=not a.no_start, rewrite_whole=a.rewrite_whole,
                            read_back=a.read_back)
        client = _client(self)
        r = _call(lambda: client.post(f"/backupjobruns/{a.run}", {"restore": spec}))["restore"]
        if a.wait:
            r = _wait(client, f"/restores/{r['id']}", "restore", RESTORE_END)
            if r["status"] != "available":
                raise exceptions.CommandError(f"restore {r['id']} ended {r['status']}: {r.get('fail_reason')}")
        return _show(r, RESTORE_FIELDS)


class ListRestore(command.Lister):
    """List restores"""

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        client = _client(self)
        restores = _call(lambda: client.get("/restores"))["restores"]
        columns = ("ID", "Run", "Type", "Status", "Created At")
        return columns, [(r["id"], r["backupjobrun_id"], r["type"], r["status"], r["created_at"]) for r in restores]


class ShowRestore(command.ShowOne):
    """Show a restore (what it produced, verified)"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("restore", metavar="<restore>")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        client = _client(self)
        return _show(_call(lambda: client.get(f"/restores/{parsed_args.restore}"))["restore"], RESTORE_FIELDS)


class CancelRestore(command.ShowOne):
    """Cancel a restore in progress"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        parser.add_argument("restore", metavar="<restore>")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        client = _client(self)
        return _show(_call(lambda: client.post(f"/restores/{parsed_args.restore}/cancel"))["restore"],
                     RESTORE_FIELDS)

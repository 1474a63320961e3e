"""``raksha job|run|restore ...``: the service's CLI (jobs, runs, restores), talking only to the API.

Every command takes ``--url`` ($RAKSHA_URL, default http://127.0.0.1:8791), ``--project``
($RAKSHA_PROJECT, default "default"), ``--cacert``/``--insecure`` for an https API, and ``--json``.
``--wait`` follows a run or restore with a progress bar until it ends; the exit status then says
whether it succeeded.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from raksha.cli.client import RESTORE_END, RUN_END, ApiClient, job_body, restore_body
from raksha.cli.output import TerminalProgress, emit, human_bytes, table
from raksha.domain.errors import EXIT_ERROR, EXIT_OK, InvalidInput
from raksha.domain.states import Consistency
from raksha.vault.engine.progress import ProgressEvent

LEVELS = tuple(level.value for level in Consistency)  # what --consistency takes: crash, filesystem, application
BEST = "best"  # job update --consistency best: back to the best each VM reaches


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--url", help="the Raksha API ($RAKSHA_URL; default http://127.0.0.1:8791)")
    p.add_argument("--project", help="project (tenant) id ($RAKSHA_PROJECT; default 'default')")
    p.add_argument("--cacert", metavar="PEM", help="CA bundle to verify an https API with ($RAKSHA_CACERT)")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify an https API's certificate ($RAKSHA_INSECURE=1; test endpoints only)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    return p


def _client(args: argparse.Namespace) -> ApiClient:
    verify = False if args.insecure else args.cacert  # None: from the environment, else the system's CAs
    return ApiClient(args.url, args.project, verify=verify)


# -- printing ----------------------------------------------------------------------------------------

def _job_text(job: dict[str, Any]) -> str:
    sched = job.get("schedule") or {}
    when = (f"every {sched['interval_hours']:g} h" if sched.get("interval_hours") else sched.get("cron", "")) or "-"
    rows = [["id", job["id"]], ["name", job["name"]], ["status", job["status"]],
            ["vms", ", ".join(vm["id"] for vm in job["vms"])], ["schedule", when],
            ["retention", ", ".join(f"{k}={v}" for k, v in (job.get("retention") or {}).items()) or "-"],
            ["consistency", job.get("consistency") or "best each VM reaches"],
            ["last run", (job.get("last_run") or {}).get("status", "-")], ["created", job["created_at"]]]
    return table(rows, ["field", "value"])


def _run_text(run: dict[str, Any]) -> str:
    head = (f"run {run['id']} of job {run['backupjob_id']}: {run['type']} {run['status']}"
            f" (consistency {run.get('consistency') or '-'}, freeze {run.get('freeze_ms') or 0} ms)")
    rows = []
    for vm in run["vms"]:
        err = (vm.get("error") or {}).get("code", "")
        if not vm["disks"]:
            rows.append([vm.get("name") or vm["vm_id"], "-", vm["status"], "-", "-", "-", err])
        for d in vm["disks"]:
            rows.append([vm.get("name") or vm["vm_id"], d["target"], d["status"], d.get("type") or "-",
                         human_bytes(d["bytes_read"]), human_bytes(d["bytes_stored"]), err])
    lines = [head, table(rows, ["vm", "disk", "status", "type", "read", "stored", "error"])]
    if run.get("fail_reason"):
        lines.append(f"error: {run['fail_reason']}")
    if run.get("verify_state") == "damaged":
        lines.append(f"verify: DAMAGED ({run.get('verified_at')}); a restore of it would fail:")
        lines += [f"  {line}" for line in (run.get("verify_note") or "").splitlines()]
    elif run.get("verify_state"):
        lines.append(f"verify: {run['verify_state']} ({run.get('verified_at')}): every chunk re-read since it finished")
    return "\n".join(lines)


def _verified(run: dict[str, Any]) -> str:
    """The scheduled verification's word on a run, for a table: damage stands out."""
    state = run.get("verify_state")
    return "DAMAGED" if state == "damaged" else state or "-"


def _restore_text(r: dict[str, Any]) -> str:
    lines = [f"restore {r['id']} of run {r['backupjobrun_id']}: {r['type']} {r['status']}"]
    rows = []
    for vm in r.get("results") or []:
        for d in vm.get("disks", []):
            written = f"{d.get('bytes_written', 0) / 1e6:.1f} MB" + (" (changed chunks)" if d.get("method") == "changed"
                                                                     else "")
            rows.append([vm.get("source_name", ""), vm.get("domain") or "-", d["target"], d["path"], written,
                         "yes" if d.get("verified") else "NO"])
    if rows:
        lines.append(table(rows, ["vm", "domain", "disk", "image", "written", "verified"]))
    if r.get("fail_reason"):
        lines.append(f"error: {r['fail_reason']}")
    return "\n".join(lines)


def _follow(client: ApiClient, path: str, key: str, terminal: tuple[str, ...], args: argparse.Namespace,
            ) -> dict[str, Any]:
    bar = TerminalProgress(sys.stderr, "none" if args.json else "auto")
    callback = bar.callback()
    start = time.monotonic()

    def update(res: dict[str, Any]) -> None:
        if callback is not None:
            callback(ProgressEvent(f"{key} {res['status']}", int(res.get("bytes_done") or 0),
                                   int(res.get("bytes_total") or 0), time.monotonic() - start))

    try:
        return client.wait(path, key, terminal, update)
    finally:
        bar.close()


# -- commands ------------------------------------------------------------------------------------------

def job_create(args: argparse.Namespace) -> int:
    excluded: dict[str, list[str]] = {}
    for item in args.exclude or []:
        vm, sep, disk = item.partition(":")
        if not sep or not disk:
            raise InvalidInput(f"--exclude takes VM:DISK (e.g. web1:vdb), not {item!r}", code="USAGE")
        excluded.setdefault(vm, []).append(disk)
    body = job_body(args.name, args.vm, excluded=excluded, description=args.description,
                    vault_service=args.vault_service, interval_hours=args.interval_hours, cron=args.cron,
                    full_every=args.full_every, consistency=args.consistency,
                    keep={k: getattr(args, k) for k in ("keep_last", "keep_daily", "keep_weekly", "keep_monthly")})
    job = _client(args).post("/backupjobs", {"backupjob": body})["backupjob"]
    emit(job, args.json, _job_text(job))
    return EXIT_OK


def job_list(args: argparse.Namespace) -> int:
    jobs = _client(args).get("/backupjobs")["backupjobs"]
    rows = [[j["id"], j["name"], j["status"], ", ".join(vm["id"] for vm in j["vms"]),
             (j.get("last_run") or {}).get("status", "-")] for j in jobs]
    emit(jobs, args.json, table(rows, ["id", "name", "status", "vms", "last run"]))
    return EXIT_OK


def job_show(args: argparse.Namespace) -> int:
    job = _client(args).get(f"/backupjobs/{args.id}")["backupjob"]
    emit(job, args.json, _job_text(job))
    return EXIT_OK


def job_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.name:
        body["name"] = args.name
    if args.description is not None:
        body["description"] = args.description
    if args.vm:
        body["vms"] = [{"id": vm} for vm in args.vm]
    if args.interval_hours or args.cron:
        body["schedule"] = {k: v for k, v in (("interval_hours", args.interval_hours), ("cron", args.cron)) if v}
    if args.no_schedule:
        body["schedule"] = None
    if args.consistency:
        body["consistency"] = None if args.consistency == BEST else args.consistency
    if not body:
        raise InvalidInput("nothing to update: give --name, --description, --vm, a schedule or --consistency",
                           code="USAGE")
    job = _client(args).put(f"/backupjobs/{args.id}", {"backupjob": body})["backupjob"]
    emit(job, args.json, _job_text(job))
    return EXIT_OK


def job_delete(args: argparse.Namespace) -> int:
    _client(args).delete(f"/backupjobs/{args.id}")
    emit({"deleted": args.id}, args.json, f"deleted backup job {args.id}")
    return EXIT_OK


def _start(args: argparse.Namespace, path: str) -> int:
    client = _client(args)
    body = {"backupjobrun": {"description": args.description}} if args.description else None
    run = client.post(f"/backupjobs/{args.id}{path}", body)["backupjobrun"]
    if args.wait:
        run = _follow(client, f"/backupjobruns/{run['id']}", "backupjobrun", RUN_END, args)
    emit(run, args.json, _run_text(run))
    return EXIT_OK if not args.wait or run["status"] == "available" else EXIT_ERROR


def job_full(args: argparse.Namespace) -> int:
    return _start(args, "/full")


def job_incremental(args: argparse.Namespace) -> int:
    return _start(args, "/incremental")


def job_run(args: argparse.Namespace) -> int:
    return _start(args, "/backupjobsruns")


def run_list(args: argparse.Namespace) -> int:
    client = _client(args)
    runs = client.get(f"/backupjobs/{args.job}/backupjobsruns" if args.job else "/backupjobruns")["backupjobruns"]
    rows = [[r["id"], r["backupjob_id"][:8], r["type"], r["status"], r.get("consistency") or "-",
             human_bytes(r["size"]), _verified(r), r["created_at"]] for r in runs]
    emit(runs, args.json, table(rows, ["id", "job", "type", "status", "consistency", "stored", "verified",
                                       "created"]))
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    run = _client(args).get(f"/backupjobruns/{args.id}")["backupjobrun"]
    emit(run, args.json, _run_text(run))
    return EXIT_OK


def run_delete(args: argparse.Namespace) -> int:
    _client(args).delete(f"/backupjobruns/{args.id}")
    emit({"deleted": args.id}, args.json, f"deleted run {args.id}")
    return EXIT_OK


def run_cancel(args: argparse.Namespace) -> int:
    run = _client(args).post(f"/backupjobruns/{args.id}/cancel")["backupjobrun"]
    emit(run, args.json, f"run {run['id']} is {run['status']}")
    return EXIT_OK


def restore_start(args: argparse.Namespace) -> int:
    client = _client(args)
    spec = restore_body(args.type, vms=args.vm, disks=args.disk, directory=args.directory, name_prefix=args.prefix,
                        fmt=args.format, keep_macs=args.keep_macs, start=not args.no_start,
                        rewrite_whole=args.rewrite_whole, read_back=args.read_back)
    r = client.post(f"/backupjobruns/{args.run}", {"restore": spec})["restore"]
    if args.wait:
        r = _follow(client, f"/restores/{r['id']}", "restore", RESTORE_END, args)
    emit(r, args.json, _restore_text(r))
    return EXIT_OK if not args.wait or r["status"] == "available" else EXIT_ERROR


def restore_list(args: argparse.Namespace) -> int:
    restores = _client(args).get("/restores")["restores"]
    rows = [[r["id"], r["backupjobrun_id"][:8], r["type"], r["status"], r["created_at"]] for r in restores]
    emit(restores, args.json, table(rows, ["id", "run", "type", "status", "created"]))
    return EXIT_OK


def restore_show(args: argparse.Namespace) -> int:
    r = _client(args).get(f"/restores/{args.id}")["restore"]
    emit(r, args.json, _restore_text(r))
    return EXIT_OK


def restore_cancel(args: argparse.Namespace) -> int:
    r = _client(args).post(f"/restores/{args.id}/cancel")["restore"]
    emit(r, args.json, f"restore {r['id']} is {r['status']}")
    return EXIT_OK


# -- parsers -------------------------------------------------------------------------------------------

def register(sub: Any) -> None:
    common = _common()
    job = sub.add_parser("job", help="backup jobs: create, list, run").add_subparsers(
        dest="job_command", metavar="ACTION", required=True)
    p = job.add_parser("create", parents=[common], help="create a backup job over VMs")
    p.add_argument("name")
    p.add_argument("--vm", action="append", required=True, help="libvirt domain name or UUID (repeat for more)")
    p.add_argument("--exclude", action="append", metavar="VM:DISK", help="leave a disk out (temp space)")
    p.add_argument("--description")
    p.add_argument("--vault-service")
    p.add_argument("--interval-hours", type=float, help="run every N hours")
    p.add_argument("--cron", help="run on a cron schedule (UTC), e.g. '0 2 * * *'")
    p.add_argument("--full-every", type=int, help="every N-th scheduled run is full")
    for k in ("keep-last", "keep-daily", "keep-weekly", "keep-monthly"):
        p.add_argument(f"--{k}", type=int, metavar="N")
    p.add_argument("--consistency", choices=LEVELS,
                   help="the level wanted: crash (no freeze), filesystem (freeze, no guest hooks) or application "
                        "(guest hooks and freeze); default: the best each VM reaches")
    p.set_defaults(func=job_create)
    p = job.add_parser("list", parents=[common], help="list backup jobs")
    p.set_defaults(func=job_list)
    for name, fn, text in (("show", job_show, "show a job"), ("delete", job_delete, "delete a job")):
        p = job.add_parser(name, parents=[common], help=text)
        p.add_argument("id")
        p.set_defaults(func=fn)
    p = job.add_parser("update", parents=[common], help="change a job")
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--description")
    p.add_argument("--vm", action="append")
    p.add_argument("--interval-hours", type=float)
    p.add_argument("--cron")
    p.add_argument("--no-schedule", action="store_true")
    p.add_argument("--consistency", choices=(*LEVELS, BEST),
                   help=f"the level wanted (as for create); {BEST}: the best each VM reaches")
    p.set_defaults(func=job_update)
    for name, fn, text in (("full", job_full, "run a full backup"),
                           ("incremental", job_incremental, "run an incremental backup"),
                           ("run", job_run, "run once (the job's policy picks full or incremental)")):
        p = job.add_parser(name, parents=[common], help=text)
        p.add_argument("id")
        p.add_argument("--description")
        p.add_argument("--wait", action="store_true", help="follow the run until it ends")
        p.set_defaults(func=fn)

    run = sub.add_parser("run", help="runs of backup jobs").add_subparsers(
        dest="run_command", metavar="ACTION", required=True)
    p = run.add_parser("list", parents=[common], help="list runs")
    p.add_argument("--job", help="only this job's")
    p.set_defaults(func=run_list)
    for name, fn, text in (("show", run_show, "show a run, per VM and disk"), ("delete", run_delete, "delete a run"),
                           ("cancel", run_cancel, "cancel a run")):
        p = run.add_parser(name, parents=[common], help=text)
        p.add_argument("id")
        p.set_defaults(func=fn)

    rest = sub.add_parser("restore", help="restore a run; list and show restores").add_subparsers(
        dest="restore_command", metavar="ACTION", required=True)
    p = rest.add_parser("start", parents=[common], help="restore a run")
    p.add_argument("run")
    p.add_argument("--type", choices=["new_vm", "files", "in_place"], default="new_vm")
    p.add_argument("--vm", action="append", help="only these VMs (names or UUIDs)")
    p.add_argument("--disk", action="append", help="only these disks (vda, vdb...)")
    p.add_argument("--directory", help="where restored images go (must exist)")
    p.add_argument("--prefix", help="new VMs are named PREFIX-<name>")
    p.add_argument("--format", choices=["raw", "qcow2"])
    p.add_argument("--keep-macs", action="store_true")
    p.add_argument("--no-start", action="store_true")
    p.add_argument("--rewrite-whole", action="store_true",
                   help="in_place: write every disk whole, not only the chunks that differ from the backup")
    p.add_argument("--read-back", action="store_true",
                   help="read every restored disk back and compare it with its backup, chunk by chunk")
    p.add_argument("--wait", action="store_true", help="follow the restore until it ends")
    p.set_defaults(func=restore_start)
    p = rest.add_parser("list", parents=[common], help="list restores")
    p.set_defaults(func=restore_list)
    for name, fn, text in (("show", restore_show, "show a restore and what it produced"),
                           ("cancel", restore_cancel, "cancel a restore")):
        p = rest.add_parser(name, parents=[common], help=text)
        p.add_argument("id")
        p.set_defaults(func=fn)

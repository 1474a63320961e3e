#!/usr/bin/env python3
"""Write docs/api/README.md: every call of the REST API with an example request (curl) and the answer it got.

The examples are real: an embedded server (``raksha serve``'s, SQLite, a local encrypted vault) on a free loopback
port, and real calls to it. With a libvirtd (root; scripts/start-libvirtd.sh) a small transient VM without an OS
is backed up for real (full, incremental) and restored to files; with ``--libvirt-uri test:///default`` no VM is
needed and the runs fail (their answers are still real). The 401 comes from the same app behind
keystonemiddleware's auth_token (a request with no token never reaches Keystone). Ids, times and paths are
replaced by stable stand-ins so that the file changes only when the API does.

Usage: .venv/bin/python scripts/api-examples.py [--out docs/api/README.md] [--libvirt-uri URI]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from raksha import conf as config  # noqa: E402
from raksha.api.urls import routes  # noqa: E402
from raksha.wsgi.embedded import Embedded  # noqa: E402

BASE = "http://127.0.0.1:8791"  # what the examples show: raksha serve's default
VM_NAME = "web1"
TENANT = "demo"


@dataclass
class Call:
    method: str
    path: str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    answer: Any = None
    answer_headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None


class Server:
    """The embedded server on a free loopback port, served by waitress in a thread."""

    def __init__(self, data_dir: Path, libvirt_uri: str, **overrides: Any) -> None:
        import socket

        from waitress.server import create_server

        conf = config.load([])
        conf.set_override("data_dir", str(data_dir))
        conf.set_override("uri", libvirt_uri, group="libvirt")
        conf.set_override("tick_seconds", 0.2, group="scheduler")
        if overrides.get("api__auth_strategy") == "keystone":
            config.register_keystone(conf)
        for key, value in overrides.items():
            group, _, opt = key.rpartition("__")
            conf.set_override(opt, value, group=group or None)
        self.embedded = Embedded(conf)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.wsgi = create_server(self.embedded.app, host="127.0.0.1", port=self.port, threads=4)
        self.thread = threading.Thread(target=self.wsgi.run, daemon=True)

    def __enter__(self) -> Server:
        self.embedded.start_background()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wsgi.close()
        self.embedded.stop()

    def call(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> Call:
        headers = dict(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            headers.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, payload, hdrs = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            status, payload, hdrs = err.code, err.read(), dict(err.headers)
        return Call(method, path, body, headers, status, json.loads(payload) if payload else None, hdrs, raw)

    def wait(self, path: str, key: str, until: tuple[str, ...], timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.call("GET", path).answer[key]
            if got["status"] in until:
                return dict(got)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} still {got['status']}")
            time.sleep(0.3)


# ---------------------------------------------------------------- a real VM (needs a libvirtd)

def start_vm(uri: str, workdir: Path) -> Any:
    """A transient domain with a 64 MiB qcow2 disk holding 8 MiB of data and no OS (SeaBIOS idles)."""
    import libvirt

    disk = workdir / f"{VM_NAME}-vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", str(disk)], check=True,
                   capture_output=True)
    conn = libvirt.open(uri)
    try:
        conn.lookupByName(VM_NAME).destroy()  # a leftover of an interrupted run of this script
    except libvirt.libvirtError:
        pass
    xml = f"""<domain type='qemu'>
  <name>{VM_NAME}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk>
  </devices>
</domain>"""
    return conn.createXML(xml, 0)


# ---------------------------------------------------------------- the calls

def record(srv: Server, keystone_srv: Server, real_vm: bool, restore_dir: Path) -> list[tuple[str, str, Call]]:
    """(section, title, call) in the order the README shows them."""
    out: list[tuple[str, str, Call]] = []
    t = f"/v1/{TENANT}"

    def add(section: str, title: str, call: Call, *expected: int) -> Call:
        if expected and call.status not in expected:
            raise SystemExit(f"api-examples: {call.method} {call.path} answered {call.status}: {call.answer}")
        out.append((section, title, call))
        return call

    s = "Versions and the API document"
    add(s, "API versions", srv.call("GET", "/"), 200)
    add(s, "Version 1", srv.call("GET", "/v1"), 200)
    doc = srv.call("GET", "/openapi.json")
    doc.answer = {"openapi": doc.answer["openapi"], "info": doc.answer["info"], "paths": {"...": "..."}}
    add(s, "The OpenAPI document (abridged here)", doc, 200)

    s = "Backup jobs"
    job = add(s, "Create a backup job", srv.call("POST", f"{t}/backupjobs", {"backupjob": {
        "name": "web", "description": "nightly, 7 runs kept", "vms": [{"id": VM_NAME}],
        "schedule": {"interval_hours": 24, "full_every": 7}, "retention": {"keep_last": 7}}}), 201).answer
    job_id = job["backupjob"]["id"]
    srv.call("PUT", f"{t}/backupjobs/{job_id}", {"backupjob": {"schedule": None}})  # no timer in the examples
    add(s, "List backup jobs (filters: name, status; paging: limit, marker)",
        srv.call("GET", f"{t}/backupjobs?limit=10"), 200)
    add(s, "Show a backup job", srv.call("GET", f"{t}/backupjobs/{job_id}"), 200)
    add(s, "Update a backup job", srv.call("PUT", f"{t}/backupjobs/{job_id}", {"backupjob": {
        "description": "nightly, 14 runs kept", "retention": {"keep_last": 14}, "consistency": "filesystem"}}), 200)

    s = "Runs"
    until = ("available", "partial", "error")
    full = add(s, "Run a full backup", srv.call("POST", f"{t}/backupjobs/{job_id}/full", {
        "backupjobrun": {"description": "before the upgrade"}}), 202).answer["backupjobrun"]
    srv.wait(f"{t}/backupjobruns/{full['id']}", "backupjobrun", until)
    add(s, "Show a run (per VM and disk: type, status, consistency, bytes, backing backup, vault URL)",
        srv.call("GET", f"{t}/backupjobs/{job_id}/backupjobsruns/{full['id']}"), 200)
    inc = add(s, "Run an incremental backup", srv.call("POST", f"{t}/backupjobs/{job_id}/incremental"),
              202).answer["backupjobrun"]
    busy = srv.call("POST", f"{t}/backupjobs/{job_id}/full")
    srv.wait(f"{t}/backupjobruns/{inc['id']}", "backupjobrun", until)
    once = add(s, "Run the job once (its policy picks full or incremental)",
               srv.call("POST", f"{t}/backupjobs/{job_id}/backupjobsruns"), 202).answer["backupjobrun"]
    srv.wait(f"{t}/backupjobruns/{once['id']}", "backupjobrun", until)
    add(s, "List a job's runs (filters: status, type; paging: limit, marker)",
        srv.call("GET", f"{t}/backupjobs/{job_id}/backupjobsruns?limit=2"), 200)
    add(s, "Update a run's description",
        srv.call("PUT", f"{t}/backupjobs/{job_id}/backupjobsruns/{once['id']}",
                 {"backupjobrun": {"description": "kept for the audit"}}), 200)
    cancel_me = srv.call("POST", f"{t}/backupjobs/{job_id}/full").answer["backupjobrun"]
    add(s, "Cancel a run", srv.call("POST", f"{t}/backupjobruns/{cancel_me['id']}/cancel"), 202)
    srv.wait(f"{t}/backupjobruns/{cancel_me['id']}", "backupjobrun", ("cancelled", *until))
    add(s, "Delete a run (and the vault data no other run needs)",
        srv.call("DELETE", f"{t}/backupjobs/{job_id}/backupjobsruns/{cancel_me['id']}"), 204)

    s = "Restores"
    source = inc if real_vm else full
    target = {"directory": str(restore_dir), "format": "qcow2"}
    restore = add(s, "Restore a run" + ("" if real_vm else " (here: a run that failed)"),
                  srv.call("POST", f"{t}/backupjobs/{job_id}/backupjobsruns/{source['id']}",
                           {"restore": {"type": "files", "target": target}}), 202, 409).answer
    if real_vm:
        rid = restore["restore"]["id"]
        srv.wait(f"{t}/restores/{rid}", "restore", ("available", "error", "cancelled"))
        add(s, "Show a restore (what it produced, verified)", srv.call("GET", f"{t}/restores/{rid}"), 200)
        add(s, "List restores (filters: status, type, backupjobrun_id; paging: limit, marker)",
            srv.call("GET", f"{t}/restores"), 200)
        again = srv.call("POST", f"{t}/backupjobruns/{source['id']}", {"restore": {
            "type": "files", "target": {"directory": str(restore_dir / "again")}}})
        (restore_dir / "again").mkdir(exist_ok=True)
        add(s, "Cancel a restore", srv.call("POST", f"{t}/restores/{again.answer['restore']['id']}/cancel"),
            202, 409)
        srv.wait(f"{t}/restores/{again.answer['restore']['id']}", "restore", ("available", "error", "cancelled"))
    else:
        add(s, "List restores (filters: status, type, backupjobrun_id; paging: limit, marker)",
            srv.call("GET", f"{t}/restores"), 200)

    s = "The 2013 client's dialect"
    old = {"X-Auth-Token": "TOKEN", "X-Auth-Project-Id": TENANT}
    legacy = add(s, "Create a backup job (one VM, an interval in hours)", srv.call("POST", f"{t}/backupjobs", {
        "backupjob": {"instance_id": VM_NAME, "vault_service": "local", "name": "legacy",
                      "description": "from a 2013 script", "hours": 6}}, headers=old), 201).answer["backupjob"]
    srv.call("PUT", f"{t}/backupjobs/{legacy['id']}", {"backupjob": {"schedule": None}})
    add(s, "List backup jobs with details", srv.call("GET", f"{t}/backupjobs/detail", headers=old), 200)
    add(s, "Prepare a run (nothing starts)", srv.call("POST", f"{t}/backupjobs/{legacy['id']}?prepare=1",
                                                       headers=old), 202)
    ran = add(s, "Run the job", srv.call("POST", f"{t}/backupjobs/{legacy['id']}", headers=old),
              202).answer["backupjobrun"]
    srv.wait(f"{t}/backupjobruns/{ran['id']}", "backupjobrun", until)
    add(s, "List runs", srv.call("GET", f"{t}/backupjobruns?limit=1", headers=old), 200)
    add(s, "List runs with details", srv.call("GET", f"{t}/backupjobruns/detail?limit=1", headers=old), 200)
    add(s, "Show a run", srv.call("GET", f"{t}/backupjobruns/{ran['id']}", headers=old), 200)
    add(s, "Restore a run with the defaults (every VM as a new VM)" + ("" if real_vm else " (a failed run)"),
        srv.call("POST", f"{t}/backupjobruns/{ran['id']}", headers=old), 202, 409)
    if real_vm:
        latest = srv.call("GET", f"{t}/restores?limit=1").answer["restores"][0]
        srv.wait(f"{t}/restores/{latest['id']}", "restore", ("available", "error", "cancelled"))
        for vm in srv.call("GET", f"{t}/restores/{latest['id']}").answer["restore"]["results"]:
            drop_domain(srv, vm.get("domain"))
    add(s, "Delete a run", srv.call("DELETE", f"{t}/backupjobruns/{ran['id']}", headers=old), 204)

    s = "Errors"
    add(s, "401: no token (auth_strategy = keystone)", keystone_srv.call("GET", f"{t}/backupjobs"), 401)
    add(s, "403: the caller's project is not the path's tenant",
        srv.call("GET", f"{t}/backupjobs", headers={"X-Auth-Project-Id": "someone-else"}), 403)
    add(s, "400: a body the schema refuses", srv.call("POST", f"{t}/backupjobs", {"backupjob": {
        "name": "x", "vms": [{"id": VM_NAME}], "retention": {"keep_last": -1}}}), 400)
    add(s, "400: a VM the hypervisor does not know", srv.call("POST", f"{t}/backupjobs", {"backupjob": {
        "name": "x", "vms": [{"id": "no-such-vm"}]}}), 400)
    add(s, "404: an unknown id", srv.call("GET", f"{t}/backupjobs/00000000-0000-0000-0000-000000000000"), 404)
    add(s, "405: a method the resource does not have", srv.call("PATCH", f"{t}/backupjobs"), 405)
    if busy.status == 409:
        add(s, "409: a job already running", busy, 409)
    add(s, "409: cancelling a run that has ended", srv.call("POST", f"{t}/backupjobruns/{full['id']}/cancel"), 409)
    bad_run = srv.call("GET", f"{t}/backupjobruns?limit=1&status=error").answer["backupjobruns"]
    if bad_run:
        add(s, "409: restoring a run that failed", srv.call("POST", f"{t}/backupjobruns/{bad_run[0]['id']}"), 409)

    s = "Backup jobs"
    add(s, "Delete a backup job (refused while it runs; its runs stay restorable until deleted themselves)",
        srv.call("DELETE", f"{t}/backupjobs/{job_id}"), 204)
    return out


def drop_domain(srv: Server, name: str | None) -> None:
    """The restore defined a new VM; the examples keep nothing."""
    if not name:
        return
    import libvirt

    conn = libvirt.open(srv.embedded.conf.libvirt.uri)
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


# ---------------------------------------------------------------- stable text

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)?")
REQ = re.compile(r"req-[0-9a-f-]{36}")
DIGEST = re.compile(r"\b[0-9a-f]{64}\b")  # keyed by the vault's key: new with every vault


class Stabilizer:
    """Ids, times and paths as stable stand-ins, the same id always the same stand-in."""

    def __init__(self, ports: list[int], paths: dict[str, str]) -> None:
        self.ids: dict[str, str] = {"00000000-0000-0000-0000-000000000000": "00000000-0000-0000-0000-000000000000"}
        self.ports = ports
        self.paths = paths

    def _id(self, m: re.Match[str]) -> str:
        if m.group(0) not in self.ids:
            self.ids[m.group(0)] = f"{len(self.ids):08x}-0000-4000-8000-{len(self.ids):012x}"
        return self.ids[m.group(0)]

    def text(self, s: str) -> str:
        for real, shown in self.paths.items():
            s = s.replace(real, shown)
        for port in self.ports:
            s = s.replace(f"http://127.0.0.1:{port}", BASE)
        s = REQ.sub("req-9f1c0de4-1b6e-4f8e-a0c4-5d2f0b7e3a61", s)
        s = STAMP.sub("2026-11-25T09:00:00Z", s)
        s = DIGEST.sub(lambda m: self.ids.setdefault(m.group(0), f"{len(self.ids):064x}"), s)
        return UUID.sub(self._id, s)

    def value(self, v: Any) -> Any:
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if k in ("eta_seconds", "freeze_ms") and isinstance(x, int | float):
                    x = 0.0 if isinstance(x, float) else 0
                out[k] = self.value(x)
            return out
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, str):
            return self.text(v)
        return v


def curl(call: Call, st: Stabilizer) -> str:
    parts = ["curl -s"]
    if call.method != "GET":
        parts.append(f"-X {call.method}")
    for name, value in call.headers.items():
        parts.append(f"-H '{name}: {value}'")
    url = st.text(f"{BASE}{call.path}")
    parts.append(f"'{url}'" if "?" in url or "&" in url else url)
    text = " ".join(parts)
    if call.body is not None:
        text += " \\\n  -d '" + json.dumps(st.value(call.body)) + "'"
    return text


def answer(call: Call, st: Stabilizer) -> str:
    reason = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
              401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
              409: "Conflict"}[call.status]
    lines = [f"HTTP/1.1 {call.status} {reason}"]
    for name in ("Location", "Allow", "WWW-Authenticate"):
        for key, value in call.answer_headers.items():
            if key.lower() == name.lower():
                lines.append(f"{name}: {st.text(value)}")
    if call.answer is not None:
        lines += ["", json.dumps(st.value(call.answer), indent=2)]
    return "\n".join(lines)


def also_at(section_calls: list[tuple[str, str, Call]]) -> dict[int, list[str]]:
    """For each shown call, the other routes of the same handler and method (the spellings and the 2013 paths)."""
    table = routes()
    shown: dict[int, list[str]] = {}
    for i, (_, _, call) in enumerate(section_calls):
        path = call.path.split("?")[0]
        for method, template, handler in table:
            pattern = "^" + re.sub(r"\\{\w+\\}", "[^/]+", re.escape(template)) + "$"
            if method == call.method and re.match(pattern, path):
                shown[i] = [f"`{m} {p}`" for m, p, h in table if h is handler and m == method and p != template]
                shown[i].insert(0, f"`{method} {template}`")
                break
    return shown


INTRO = """# The Raksha REST API v1

Every call of the API with one example: the request as `curl` and the answer the server gave. The examples are
real calls against a real embedded server (`raksha serve`), written by `scripts/api-examples.py`; ids, times and
paths are replaced by stable stand-ins. The machine-readable contract is [openapi.json](openapi.json) (also served
at `GET /openapi.json`); `tests/functional/test_api_fuzz.py` fuzzes the server against it.

- **Base URL**: `raksha serve` listens on `http://127.0.0.1:8791` (`[api] host`, `port`). Every resource is under
  `/v1/{tenant_id}`: the project that owns it.
- **Auth**: `[api] auth_strategy = noauth` (the embedded all-in-one): no token, the path's tenant is the caller.
  `keystone`: keystonemiddleware's `auth_token` validates the `X-Auth-Token` header against Keystone
  (`[keystone_authtoken]`), the token's project must be the path's `{tenant_id}` (else 403 `PROJECT_MISMATCH`),
  and oslo.policy decides per call: readers list and show, members also create, update, delete, run, restore
  and cancel (admins too). `[api] policy_file` overrides any rule (`raksha:backupjob:create` and so on). The
  2013 client's `X-Auth-Project-Id` header is accepted and must name the token's project (id or name).
  A cloud's `raksha.conf` (the service user needs Keystone's `service` role to validate tokens; with
  `memcached_servers` unset, validated tokens are cached in the process):

  ```ini
  [api]
  auth_strategy = keystone
  # policy_file = /etc/raksha/policy.yaml   e.g.  "raksha:backupjob:create": "role:reader"

  [keystone_authtoken]
  www_authenticate_uri = http://keystone.example:5000/v3
  auth_url = http://keystone.example:5000/v3
  auth_type = password
  username = raksha
  password = SECRET
  project_name = service
  user_domain_name = Default
  project_domain_name = Default
  ```

  `scripts/start-keystone.sh` runs a real Keystone on loopback for the tests (`tests/functional/test_api_keystone.py`).
- **Bodies** wrap the resource: `{"backupjob": {...}}`, `{"backupjobrun": {...}}`, `{"restore": {...}}`. Long
  work (runs, restores, cancels) answers `202 Accepted` with the resource and its `status`; watch it with `GET`
  (`progress_percent`, `bytes_done`, `bytes_total`, `eta_seconds`).
- **Lists** page with `limit` (1 to 1000, default 100) and `marker` (the last id of the previous page); a full page
  carries a `next` link in `<collection>_links`. Unknown query parameters are refused.
- **Errors** are always JSON: `{"error": {"code", "message", "retryable", "request_id", "details"?}}`, with a
  stable `code` to match on; every answer carries `X-Openstack-Request-Id`.
- **Spellings**: the seed's nested collection is `backupjobsruns`; the 2013 client's `backupjobruns` reaches the
  same handlers, nested under a job or at the top level. Each example lists the routes it stands for.
"""


def render(calls: list[tuple[str, str, Call]], st: Stabilizer, real_vm: bool) -> str:
    routes_of = also_at(calls)
    lines = [INTRO]
    if not real_vm:
        lines.append("> These examples were made without a libvirtd (`--libvirt-uri test:///default`): runs fail "
                     "there, so the restore examples show refusals.\n")
    lines.append("## Contents\n")
    sections = list(dict.fromkeys(section for section, _, _ in calls))
    for section in sections:
        anchor = re.sub(r"[^a-z0-9 -]", "", section.lower()).replace(" ", "-")
        lines.append(f"- [{section}](#{anchor})")
    lines.append("")
    for section in sections:
        lines.append(f"## {section}\n")
        for i, (sec, title, call) in enumerate(calls):
            if sec != section:
                continue
            lines.append(f"### {title}\n")
            if routes_of.get(i):
                lines.append("Routes: " + ", ".join(routes_of[i]) + "\n")
            lines.append("```sh\n" + curl(call, st) + "\n```\n")
            lines.append("```http\n" + answer(call, st) + "\n```\n")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "api" / "README.md"))
    ap.add_argument("--libvirt-uri", default=None,
                    help="default: a real libvirtd (scripts/start-libvirtd.sh) when root, else test:///default")
    args = ap.parse_args()
    uri = args.libvirt_uri
    if uri is None:
        done = subprocess.run([str(REPO / "scripts" / "start-libvirtd.sh")], capture_output=True, text=True,
                              check=False)
        uri = done.stdout.strip().splitlines()[-1] if done.returncode == 0 else "test:///default"
    real_vm = not uri.startswith("test:")
    work = Path(tempfile.mkdtemp(prefix="raksha-api-examples-"))
    work.chmod(0o711)  # libvirt's QEMU runs as its own user (libvirt-qemu): it must reach the VM's disk
    dom = None
    try:
        if real_vm:
            dom = start_vm(uri, work)
        restore_dir = work / "restored"
        restore_dir.mkdir()
        keystone = {"api__auth_strategy": "keystone", "keystone_authtoken__www_authenticate_uri":
                    "http://127.0.0.1:5000/v3", "keystone_authtoken__auth_url": "http://127.0.0.1:5000/v3"}
        with Server(work / "data", uri) as srv, Server(work / "data-keystone", "test:///default",
                                                       **keystone) as ks:
            calls = record(srv, ks, real_vm, restore_dir)
            st = Stabilizer([srv.port, ks.port], {str(restore_dir): "/srv/restored", str(work / "data"):
                                                   "/var/lib/raksha", str(work): "/var/lib/libvirt/images"})
            text = render(calls, st, real_vm)
    finally:
        if dom is not None:
            try:
                dom.destroy()
            except Exception:  # already gone
                pass
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(text)
    print(f"api-examples: wrote {args.out} ({len(calls)} calls, libvirt {uri})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

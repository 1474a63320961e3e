#!/usr/bin/env python3
"""The main job, as `make demo` runs it: protect two running VMs with the service and bring them back.

Starts libvirtd and the embedded all-in-one server (`raksha serve`: SQLite, an encrypted local vault,
no auth), boots two tiny guests (a qcow2 and a raw data disk each), and then, with the `raksha` CLI only:
creates a job over both, runs a full backup, writes data inside the guests, runs an incremental,
restores the incremental to new VMs, boots them and checks the data is there. Prints each step's time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "functional"))
import libvirt  # noqa: E402
from libvirt_guests import GuestDomain, build_guest, make_data_disk, start_libvirtd  # noqa: E402

RAKSHA = str(Path(sys.executable).parent / "raksha")
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised; don't also print them
steps: list[tuple[str, float, str]] = []


def step(name: str, fn: Callable[[], Any], detail: Callable[[Any], str] = lambda _: "") -> Any:
    print(f"== {name}", flush=True)
    t0 = time.monotonic()
    out = fn()
    steps.append((name, time.monotonic() - t0, detail(out)))
    return out


def cli(*args: str, env: dict[str, str]) -> Any:
    """Run the raksha CLI; --wait shows its progress bar on a terminal; JSON comes back."""
    proc = subprocess.run([RAKSHA, *args, "--json"], env=env, stdout=subprocess.PIPE, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        sys.exit(f"demo: `raksha {' '.join(args)}` failed (exit {proc.returncode}):\n{proc.stdout}")
    return json.loads(proc.stdout)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/raksha-demo"),
                        help="the demo server's data (wiped first)")
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it starts libvirtd and QEMU guests)")
    port = args.port if port_free(args.port) else 18791
    data = args.data_dir
    shutil.rmtree(data, ignore_errors=True)
    (data / "guests").mkdir(parents=True)
    started = time.monotonic()

    uri = step("start libvirtd", start_libvirtd)
    conn = libvirt.open(uri)
    guest = step("build the test guest (cached)", build_guest)
    disks = step("make two data disks (qcow2, raw)", lambda: (
        make_data_disk(data / "guests" / "web.qcow2", "128M"),
        make_data_disk(data / "guests" / "db.raw", "128M", fmt="raw")))
    log = open(data / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    server: subprocess.Popen[bytes] | None = None
    env = {**os.environ, "RAKSHA_URL": f"http://127.0.0.1:{port}", "RAKSHA_PROJECT": "demo"}
    restored: list[GuestDomain] = []
    try:
        # web is defined (persistent): it is restored in place at the end, which keeps the same domain.
        web_dom = conn.defineXML(GuestDomain(conn, guest, [(disks[0], "qcow2")], data / "guests",
                                             name="raksha-demo-web").xml)
        web_dom.create()
        with GuestDomain.attached(conn, web_dom, data / "guests") as web, \
                GuestDomain(conn, guest, [(disks[1], "raw")], data / "guests", name="raksha-demo-db") as db:
            def boot() -> float:
                return max(web.wait_for_agent(timeout=300), db.wait_for_agent(timeout=300))

            step("boot two guests (TCG) until their agents answer", boot, lambda s: f"{s:.1f} s")

            def wait_server() -> None:
                nonlocal server
                server = subprocess.Popen([RAKSHA, "serve", "--data-dir", str(data / "server"), "--port", str(port),
                                           "--libvirt-uri", uri], stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
                for _ in range(400):
                    if not port_free(port):
                        return
                    if server.poll() is not None:
                        sys.exit(f"demo: raksha serve exited; see {data / 'server.log'}")
                    time.sleep(0.05)
                sys.exit("demo: raksha serve did not start listening")

            step(f"raksha serve (API on 127.0.0.1:{port}) until it listens", wait_server)
            job = step("raksha job create app --vm raksha-demo-web --vm raksha-demo-db",
                       lambda: cli("job", "create", "app", "--vm", "raksha-demo-web", "--vm", "raksha-demo-db",
                                   "--keep-last", "5", env=env), lambda j: j["id"])

            def write(name: str, size: int) -> dict[str, str]:
                sums = {}
                for vm in (web, db):
                    payload = os.urandom(size)
                    code, _ = vm.exec(f"cat > /mnt/vda/{name} && sync", stdin=payload)
                    assert code == 0, f"{vm.name}: writing {name} failed"
                    sums[vm.name] = payload.hex()
                return sums

            monday = step("write /mnt/vda/monday.bin in both guests", lambda: write("monday.bin", 48 << 10))
            full = step("raksha job full --wait", lambda: cli("job", "full", job["id"], "--wait", env=env),
                        _run_detail)
            tuesday = step("write /mnt/vda/tuesday.bin in both guests", lambda: write("tuesday.bin", 48 << 10))
            incr = step("raksha job incremental --wait",
                        lambda: cli("job", "incremental", job["id"], "--wait", env=env), _run_detail)
            rest = step("raksha restore start <incremental> --type new_vm --wait",
                        lambda: cli("restore", "start", incr["id"], "--type", "new_vm", "--prefix", "restored",
                                    "--wait", env=env),
                        lambda r: ", ".join(vm["domain"] for vm in r["results"]))
            if rest["status"] != "available":
                sys.exit(f"demo: restore ended {rest['status']}: {rest.get('fail_reason')}")
            for vm in rest["results"]:
                restored.append(GuestDomain.attached(conn, conn.lookupByName(vm["domain"]), data / "guests"))

            def check() -> str:
                for copy, vm in zip(restored, rest["results"], strict=True):
                    copy.wait_for_agent(timeout=300)
                    for name, sums in (("monday.bin", monday), ("tuesday.bin", tuesday)):
                        code, out = copy.exec(f"cat /mnt/vda/{name}")
                        if code != 0 or out.hex() != sums[vm["source_name"]]:
                            sys.exit(f"demo: {copy.name}: /mnt/vda/{name} differs from what "
                                     f"{vm['source_name']} held")
                return "both files match in both VMs"

            step("boot the restored VMs and read the data back through their agents", check, lambda s: s)

            def mistake() -> None:
                code, _ = web.exec("rm /mnt/vda/tuesday.bin && sync")
                assert code == 0, "deleting tuesday.bin in raksha-demo-web failed"

            step("delete /mnt/vda/tuesday.bin in raksha-demo-web (the mistake)", mistake)
            undo = step("raksha restore start <incremental> --type in_place --vm raksha-demo-web --wait",
                        lambda: cli("restore", "start", incr["id"], "--type", "in_place", "--vm", "raksha-demo-web",
                                    "--wait", env=env), _in_place_detail)
            if undo["status"] != "available":
                sys.exit(f"demo: in-place restore ended {undo['status']}: {undo.get('fail_reason')}")

            def check_undo() -> str:
                web.wait_for_agent(timeout=300)
                code, out = web.exec("cat /mnt/vda/tuesday.bin")
                if code != 0 or out.hex() != tuesday["raksha-demo-web"]:
                    sys.exit("demo: raksha-demo-web: /mnt/vda/tuesday.bin is not back")
                return "tuesday.bin is back"

            step("raksha-demo-web boots again; read tuesday.bin through its agent", check_undo, lambda s: s)
    finally:
        for copy in restored:
            copy.__exit__(None, None, None)
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()

    print("\nRaksha demo: two running VMs protected, changed, brought back as new VMs, and one mistake undone "
          "in place\n")
    width = max(len(s[0]) for s in steps)
    for name, seconds, detail in steps:
        print(f"  {name.ljust(width)}  {seconds:7.2f} s  {detail}")
    print(f"\n  full: {_run_detail(full)}\n  incremental: {_run_detail(incr)}")
    print(f"  total {time.monotonic() - started:.1f} s; server data and log in {data}")
    return 0


def _in_place_detail(restore: dict[str, Any]) -> str:
    disks = [d for vm in restore.get("results") or [] for d in vm["disks"]]
    return ", ".join(f"{d['target']}: {d['bytes_written'] / 2**10:.0f} KiB written"
                     + (" (only what differs)" if d["method"] == "changed" else " (whole disk)") for d in disks)


def _run_detail(run: dict[str, Any]) -> str:
    if run["status"] != "available":
        sys.exit(f"demo: run {run['id']} ended {run['status']}: {run.get('fail_reason')}")
    disks = [d for vm in run["vms"] for d in vm["disks"]]
    read = sum(d["bytes_read"] for d in disks) / 2**20
    stored = sum(d["bytes_stored"] for d in disks) / 2**20
    return (f"{run['type']} {run['status']}, {run['consistency']}, freeze {run['freeze_ms']} ms, "
            f"read {read:.1f} MiB, stored {stored:.1f} MiB over {len(disks)} disks")


if __name__ == "__main__":
    sys.exit(main())

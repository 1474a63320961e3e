"""Cancel and recovery through the API on a real guest under a real libvirtd.

- Cancelling a run in the middle of its transfer ends it ``cancelled`` with the guest thawed and no pull
  job left, and the next run succeeds; cancelling a restore (files, new VM) ends it ``cancelled`` with no
  partial output left.
- A ``raksha serve`` killed with SIGKILL in the middle of a run: on restart the run is ``error`` with
  ``INTERRUPTED``, the guest is thawed and its pull job ended, and the next run succeeds.

The guest has a small ext4 disk and a 512 MiB raw disk of random bytes, so a full run or a restore takes
long enough to be caught in the middle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, make_data_disk  # noqa: E402
from raksha_server import Client, Server, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RAKSHA = REPO / ".venv" / "bin" / "raksha"
RUN_END = ("available", "partial", "error", "cancelled")


@pytest.fixture(scope="module")
def guest(conn: libvirt.virConnect, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestDomain]:
    work = tmp_path_factory.mktemp("cancel-guest")
    big = work / "big.raw"
    with open(big, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(8 << 20))
    disks = [(make_data_disk(work / "small.qcow2", "32M"), "qcow2"), (big, "raw")]
    with GuestDomain(conn, build_guest(), disks, work, name="raksha-cancel-a") as vm:
        vm.wait_for_agent(timeout=240)
        yield vm


def _t(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _settled(vm: GuestDomain) -> None:
    """The guest is thawed and has no pull job: what a cancelled or interrupted run must leave."""
    assert vm.dom is not None
    assert vm.agent("guest-fsfreeze-status") == "thawed"
    assert vm.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    assert vm.exec("echo alive > /mnt/vda/alive && sync")[0] == 0  # the guest writes


def _until_moving(api: Client, path: str, key: str, working: str) -> dict[str, Any]:
    """Poll until the resource is ``working`` with bytes done: in the middle of its transfer."""
    deadline = time.monotonic() + 300
    while True:
        res = api.get(path).body[key]
        if res["status"] == working and res["bytes_done"]:
            return dict(res)
        assert res["status"] in ("queued", "snapshotting", "uploading", "restoring"), res
        assert time.monotonic() < deadline, res
        time.sleep(0.1)


def _job(api: Client, vm: GuestDomain) -> dict[str, Any]:
    resp = api.post("/backupjobs", {"backupjob": {"name": "big", "vms": [{"id": vm.name}]}})
    assert resp.status == 201, resp
    return dict(resp.body["backupjob"])


def test_cancel_a_run_and_restores_mid_transfer(conn: libvirt.virConnect, guest: GuestDomain,
                                                tmp_path: Path) -> None:
    with Server(tmp_path / "srv", libvirt_uri=conn.getURI()) as srv:
        api = srv.client("cancel")
        job = _job(api, guest)
        run = api.post(f"/backupjobs/{job['id']}/full").body["backupjobrun"]
        path = f"/backupjobruns/{run['id']}"
        moving = _until_moving(api, path, "backupjobrun", "uploading")
        t0 = time.monotonic()
        resp = api.post(f"{path}/cancel")
        assert resp.status == 202 and resp.body["backupjobrun"]["status"] == "cancelling", resp
        run = api.wait(path, "backupjobrun", until=RUN_END, timeout=120)
        cancel_s = time.monotonic() - t0
        assert run["status"] == "cancelled", run
        assert 0 < moving["bytes_done"] < moving["bytes_total"]
        assert [vm["status"] for vm in run["vms"]] == ["cancelled"]
        assert run["vms"][0]["error"]["code"] == "CANCELLED"
        _settled(guest)

        # The next run is not troubled by the cancelled one.
        run = api.post(f"/backupjobs/{job['id']}/full").body["backupjobrun"]
        run = api.wait(f"/backupjobruns/{run['id']}", "backupjobrun", until=RUN_END, timeout=600)
        assert run["status"] == "available", run
        disks = {d["target"]: d for d in run["vms"][0]["disks"]}
        print(f"\nfull run: { {t: (d['bytes_read'], d['bytes_stored']) for t, d in disks.items()} }, "
              f"{_t(run['finished_at']) - _t(run['started_at']):.1f} s")
        assert sorted(disks) == ["vda", "vdb"]
        _settled(guest)

        # A files restore cancelled mid-way leaves nothing in its directory.
        out = tmp_path / "out"
        out.mkdir()
        started = api.post(f"/backupjobruns/{run['id']}", {"restore": {
            "type": "files", "target": {"directory": str(out), "format": "raw"}}})
        assert started.status == 202, started
        rpath = f"/restores/{started.body['restore']['id']}"
        _until_moving(api, rpath, "restore", "restoring")
        assert api.post(f"{rpath}/cancel").status == 202
        restore = api.wait(rpath, "restore", until=("available", "error", "cancelled"), timeout=120)
        assert restore["status"] == "cancelled" and restore["error"]["code"] == "CANCELLED", restore
        assert sorted(os.listdir(out)) == []

        # A new-VM restore cancelled mid-way defines no domain and leaves no disk in the server's directory.
        started = api.post(f"/backupjobruns/{run['id']}", {"restore": {
            "type": "new_vm", "target": {"name_prefix": "cx", "start": False}}})
        assert started.status == 202, started
        restore_id = started.body["restore"]["id"]
        rpath = f"/restores/{restore_id}"
        _until_moving(api, rpath, "restore", "restoring")
        assert api.post(f"{rpath}/cancel").status == 202
        restore = api.wait(rpath, "restore", until=("available", "error", "cancelled"), timeout=120)
        assert restore["status"] == "cancelled", restore
        assert not [d for d in conn.listAllDomains() if d.name().startswith("cx-")]
        restored = Path(srv.embedded.conf.data_dir) / "restored"
        assert not (restored / restore_id).exists() or not os.listdir(restored / restore_id)
        print(f"\nrun cancelled {cancel_s:.2f} s after the cancel (at {moving['bytes_done']} of "
              f"{moving['bytes_total']} bytes)")

        # Two VMs: the one restored whole before the cancel goes too; a cancelled restore leaves nothing.
        with GuestDomain(conn, build_guest(), [(make_data_disk(tmp_path / "b.qcow2", "32M"), "qcow2")], tmp_path,
                         name="raksha-cancel-b") as small:
            small.wait_for_agent(timeout=240)
            both = api.post("/backupjobs", {"backupjob": {"name": "two", "vms": [{"id": small.name},
                                                                                 {"id": guest.name}]}})
            assert both.status == 201, both
            run = api.post(f"/backupjobs/{both.body['backupjob']['id']}/full").body["backupjobrun"]
            run = api.wait(f"/backupjobruns/{run['id']}", "backupjobrun", until=RUN_END, timeout=600)
            assert run["status"] == "available", run
        out = tmp_path / "out2"
        out.mkdir()
        started = api.post(f"/backupjobruns/{run['id']}", {"restore": {
            "type": "files", "vms": ["raksha-cancel-b", guest.name], "target": {"directory": str(out),
                                                                               "format": "raw"}}})
        assert started.status == 202, started
        rpath = f"/restores/{started.body['restore']['id']}"
        deadline = time.monotonic() + 120
        while not any(name.startswith(guest.name) for name in os.listdir(out)):  # the small VM done, the big begun
            assert time.monotonic() < deadline, os.listdir(out)
            time.sleep(0.01)
        finished_first = sorted(os.listdir(out))
        assert api.post(f"{rpath}/cancel").status == 202
        restore = api.wait(rpath, "restore", until=("available", "error", "cancelled"), timeout=120)
        assert restore["status"] == "cancelled", restore
        assert any(name.startswith("raksha-cancel-b") for name in finished_first), finished_first
        assert sorted(os.listdir(out)) == []


class ServeProcess:
    """``raksha serve`` as a real subprocess on a free port."""

    def __init__(self, data_dir: Path, uri: str) -> None:
        self.data_dir, self.uri, self.port = data_dir, uri, free_port()
        self.log = data_dir.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Client:
        conf = self.data_dir.parent / "raksha.conf"
        conf.write_text("[scheduler]\ntick_seconds = 0.2\n")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(RAKSHA), "serve", "--data-dir", str(self.data_dir), "--port", str(self.port),
                 "--libvirt-uri", self.uri, "--config-file", str(conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        client = Client(f"http://127.0.0.1:{self.port}")
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.get("/").status == 200:
                    break
            except OSError:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)
        return Client(f"http://127.0.0.1:{self.port}/v1/recover")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)


def test_server_killed_mid_run_recovers(conn: libvirt.virConnect, guest: GuestDomain, tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServeProcess(data, conn.getURI())
    api = server.start()
    try:
        job = _job(api, guest)
        run = api.post(f"/backupjobs/{job['id']}/full").body["backupjobrun"]
        path = f"/backupjobruns/{run['id']}"
        _until_moving(api, path, "backupjobrun", "uploading")
    finally:
        server.kill()
    assert guest.dom is not None
    assert guest.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE  # the dead server's pull job is still open

    t0 = time.monotonic()
    api = server.start()
    try:
        ready_s = time.monotonic() - t0
        run = api.get(path).body["backupjobrun"]
        assert run["status"] == "error", run
        assert run["error"]["code"] == "INTERRUPTED"
        assert run["vms"][0]["status"] == "error" and run["vms"][0]["error"]["code"] == "INTERRUPTED"
        _settled(guest)  # the restart ended the dead run's pull job and the guest is thawed

        run = api.post(f"/backupjobs/{job['id']}/full").body["backupjobrun"]
        run = api.wait(f"/backupjobruns/{run['id']}", "backupjobrun", until=RUN_END, timeout=600)
        assert run["status"] == "available", run
        assert run["vms"][0]["consistency"] == "filesystem"
        _settled(guest)

        # Killed in the middle of a new-VM restore: on restart it is error INTERRUPTED, and its half-written
        # disks are gone from the server's directory.
        started = api.post(f"/backupjobruns/{run['id']}", {"restore": {
            "type": "new_vm", "target": {"name_prefix": "kx", "start": False}}})
        assert started.status == 202, started
        restore_id = started.body["restore"]["id"]
        _until_moving(api, f"/restores/{restore_id}", "restore", "restoring")
    finally:
        server.kill()
    partial = data / "restored" / restore_id
    assert partial.is_dir() and os.listdir(partial)  # what the killed server was writing
    api = server.start()
    out = tmp_path / "mine"
    out.mkdir()
    try:
        restore = api.get(f"/restores/{restore_id}").body["restore"]
        assert restore["status"] == "error" and restore["error"]["code"] == "INTERRUPTED", restore
        assert not partial.exists()
        assert not [d for d in conn.listAllDomains() if d.name().startswith("kx-")]

        # Killed in the middle of a files restore into a directory the caller named: the half-written
        # image goes on restart; what is not Raksha's there stays.
        (out / "notes.txt").write_text("the caller's own file\n")
        started = api.post(f"/backupjobruns/{run['id']}", {"restore": {
            "type": "files", "target": {"directory": str(out), "format": "raw"}}})
        assert started.status == 202, started
        restore_id = started.body["restore"]["id"]
        _until_moving(api, f"/restores/{restore_id}", "restore", "restoring")
    finally:
        server.kill()
    assert [n for n in os.listdir(out) if n.endswith(".raksha-partial")]  # what the killed server was writing
    api = server.start()
    try:
        restore = api.get(f"/restores/{restore_id}").body["restore"]
        assert restore["status"] == "error" and restore["error"]["code"] == "INTERRUPTED", restore
        left = sorted(os.listdir(out))
        assert "notes.txt" in left and not [n for n in left if n.endswith(".raksha-partial")], left
    finally:
        server.kill(signal.SIGTERM)
    print(f"\nrestarted and recovered in {ready_s:.2f} s")

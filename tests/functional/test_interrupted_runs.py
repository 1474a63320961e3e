"""A run killed with SIGKILL never leaves a guest frozen, or a pull job or bitmap that breaks the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, debugfs_cat, make_data_disk  # noqa: E402

from raksha.hypervisor.group_backup import backup_domains, checkpoint_name  # noqa: E402
from raksha.hypervisor.pull import FILESYSTEM  # noqa: E402
from raksha.hypervisor.qemu_blocks import qmp  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.restore import restore_backup  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.format.naming import BackupId  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402

# Stands for a Raksha process in the middle of its work: it holds what a real run holds at that point.
MID_TRANSFER = """
import sys, time, libvirt
from raksha.hypervisor.pull import consistency_group
dom = libvirt.open("qemu:///system").lookupByName(sys.argv[1])
parent = sys.argv[2] if len(sys.argv) > 2 else None
with consistency_group([(dom, parent)], "raksha-job-killed") as point:
    if point.domains[0].error is not None:
        raise point.domains[0].error
    src = point.domains[0].source(point.domains[0].disks[0])
    src.pread(0, 65536)
    print("transferring", flush=True)
    time.sleep(600)
"""
MID_FREEZE = """
import json, sys, time, libvirt, libvirt_qemu
dom = libvirt.open("qemu:///system").lookupByName(sys.argv[1])
libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-fsfreeze-freeze"}), 10, 0)
print("frozen", flush=True)
time.sleep(600)
"""



def kill_when(script: str, domain: str, marker: str, *args: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), domain, *args], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == marker
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_next_run_after_a_kill_mid_transfer_and_mid_freeze(conn: libvirt.virConnect, tmp_path: Path) -> None:
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    disks = [(make_data_disk(tmp_path / "a.qcow2", "64M"), "qcow2"),
             (make_data_disk(tmp_path / "b.raw", "32M", fmt="raw"), "raw")]  # raw: tracked by a QEMU bitmap
    with GuestDomain(conn, build_guest(), disks, tmp_path, name="raksha-kill-a") as vm:
        vm.wait_for_agent()
        assert vm.dom is not None

        kill_when(MID_TRANSFER, vm.name, "transferring")
        assert vm.agent("guest-fsfreeze-status") == "thawed"  # thawed before any transfer started
        assert vm.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE  # the dead run's pull job is still open
        first = backup_domains(conn, [vm.name], vault, "job", "run1", retire_runs=["killed"])
        assert first.vms[0].consistency == FILESYSTEM and first.vms[0].disks[0].kind == "full"
        assert [c.getName() for c in vm.dom.listAllCheckpoints()] == ["raksha-job-run1"]  # the killed run's went
        assert vm.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE

        kill_when(MID_FREEZE, vm.name, "frozen")
        assert vm.agent("guest-fsfreeze-status") == "frozen"
        time.sleep(0.5)
        second = backup_domains(conn, [vm.name], vault, "job", "run2", parent_run="run1")
        assert vm.agent("guest-fsfreeze-status") == "thawed"
        assert second.vms[0].consistency == FILESYSTEM
        assert "interrupted run" in second.vms[0].why
        assert [d.kind for d in second.vms[0].disks] == ["incremental", "incremental"]
        assert vm.exec("echo alive > /mnt/vda/alive && sync")[0] == 0  # the guest writes again

        # Killed mid-transfer of an incremental (the raw disk's parent bitmap was copied and read):
        # the parent bitmap and checkpoint still make the next run a correct incremental.
        kill_when(MID_TRANSFER, vm.name, "transferring", checkpoint_name("job", "run2"))
        data = os.urandom(48 << 10)
        assert vm.exec("cat > /mnt/vdb/after-kill.bin && sync", stdin=data)[0] == 0
        assert "raksha-job-killed" in [c.getName() for c in vm.dom.listAllCheckpoints()]  # what the kill left
        third = backup_domains(conn, [vm.name], vault, "job", "run3", parent_run="run2", retire_runs=["killed"])
        assert [d.kind for d in third.vms[0].disks] == ["incremental", "incremental"]
        assert vm.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
        (vdb,) = [dev["inserted"] for dev in qmp(vm.dom, "query-block")
                  if dev.get("inserted", {}).get("file", "").endswith("b.raw")]
        bitmaps = [b.get("name") for b in vdb.get("dirty-bitmaps", [])]
        assert bitmaps == ["raksha-job-run3"]  # neither the killed run's bitmap nor a "~read" copy is left
        assert [c.getName() for c in vm.dom.listAllCheckpoints()] == ["raksha-job-run3"]
        (vda,) = [dev["inserted"] for dev in qmp(vm.dom, "query-block")
                  if dev.get("inserted", {}).get("file", "").endswith("a.qcow2")]
        assert [b.get("name") for b in vda.get("dirty-bitmaps", [])] == ["raksha-job-run3"]
        out = tmp_path / "run3-vdb.raw"
        restore_backup(vault, BackupId.parse(f"job/run3/{third.vms[0].uuid}/vdb"), str(out))
        assert debugfs_cat(out, "/after-kill.bin") == data

"""A run killed with SIGKILL never leaves a guest frozen or a pull job that breaks the next run."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, make_data_disk  # noqa: E402

from raksha.hypervisor.group_backup import backup_domains  # noqa: E402
from raksha.hypervisor.pull import FILESYSTEM  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402

# Stands for a Raksha process in the middle of its work: it holds what a real run holds at that point.
MID_TRANSFER = """
import sys, time, libvirt
from raksha.hypervisor.pull import consistency_group
dom = libvirt.open("qemu:///system").lookupByName(sys.argv[1])
with consistency_group([(dom, None)], "raksha-killed") as point:
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



def kill_when(script: str, domain: str, marker: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), domain], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == marker
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_next_run_after_a_kill_mid_transfer_and_mid_freeze(conn: libvirt.virConnect, tmp_path: Path) -> None:
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    with GuestDomain(conn, build_guest(), [(make_data_disk(tmp_path / "a.qcow2", "64M"), "qcow2")], tmp_path,
                     name="raksha-kill-a") as vm:
        vm.wait_for_agent()
        assert vm.dom is not None

        kill_when(MID_TRANSFER, vm.name, "transferring")
        assert vm.agent("guest-fsfreeze-status") == "thawed"  # thawed before any transfer started
        assert vm.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE  # the dead run's pull job is still open
        first = backup_domains(conn, [vm.name], vault, "job", "run1")
        assert first.vms[0].consistency == FILESYSTEM and first.vms[0].disks[0].kind == "full"
        assert vm.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE

        kill_when(MID_FREEZE, vm.name, "frozen")
        assert vm.agent("guest-fsfreeze-status") == "frozen"
        time.sleep(0.5)
        second = backup_domains(conn, [vm.name], vault, "job", "run2", parent_run="run1")
        assert vm.agent("guest-fsfreeze-status") == "thawed"
        assert second.vms[0].consistency == FILESYSTEM
        assert "interrupted run" in second.vms[0].why
        assert second.vms[0].disks[0].kind == "incremental"
        assert vm.exec("echo alive > /mnt/vda/alive && sync")[0] == 0  # the guest writes again

"""After a good pull backup, what could not be dropped (the parent's checkpoint and bitmaps) is said on
the VM as a warning, and the backup stays good (issue 4, item 6).

Real guest, real libvirtd; the failure is injected at one narrow seam: the QMP call that removes a
bitmap and libvirt's checkpoint delete are made to do nothing, as when another tool holds them. What
the warning names is then checked against the domain itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, make_data_disk  # noqa: E402

from raksha.domain.errors import VaultLocked  # noqa: E402
from raksha.hypervisor import pull  # noqa: E402
from raksha.hypervisor.group_backup import backup_domains  # noqa: E402
from raksha.hypervisor.qemu_blocks import node_bitmaps, top_nodes  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.locks import LockKind  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402


def bitmaps(dom: libvirt.virDomain) -> dict[str, set[str]]:
    return {t: set(node_bitmaps(node)) for t, node in top_nodes(dom).items()}


def test_old_bases_that_stay_after_a_good_run_are_warnings(conn: libvirt.virConnect, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    vda = make_data_disk(tmp_path / "vda.qcow2", "16M")
    vdb = tmp_path / "vdb.raw"
    vdb.write_bytes(bytes(16 << 20))
    with GuestDomain(conn, build_guest(), [(vda, "qcow2"), (vdb, "raw")], tmp_path, name="raksha-cleanup") as vm:
        vm.wait_for_agent()
        first = backup_domains(conn, [vm.name], vault, "job", "r1")
        assert first.vms[0].error is None and first.vms[0].warnings == []
        assert vm.dom is not None
        assert bitmaps(vm.dom) == {"vda": {"raksha-job-r1"}, "vdb": {"raksha-job-r1"}}

        real_try = pull.try_qmp
        monkeypatch.setattr(pull, "try_qmp", lambda dom, command, **kw: False if command ==
                            "block-dirty-bitmap-remove" else real_try(dom, command, **kw))
        monkeypatch.setattr(pull, "_delete_checkpoint", lambda dom, name, *, metadata_fallback: False)
        code, _ = vm.exec("dd if=/dev/urandom of=/dev/vdb bs=4096 count=4 conv=fsync 2>/dev/null")
        assert code == 0
        second = backup_domains(conn, [vm.name], vault, "job", "r2", parent_run="r1")
        monkeypatch.undo()

        (result,) = second.vms
        assert result.error is None
        assert {d.target: d.kind for d in result.disks} == {"vda": "incremental", "vdb": "incremental"}
        warnings = sorted(result.warnings)
        assert len(warnings) == 3, warnings
        assert warnings[0].startswith(f"{vm.name}: checkpoint raksha-job-r1 could not be deleted")
        assert warnings[1].startswith(f"{vm.name}:vda: dirty bitmap(s) raksha-job-r1 could not be removed")
        assert warnings[2].startswith(f"{vm.name}:vdb: dirty bitmap(s) raksha-job-r1 could not be removed")
        # What the warnings say is what the domain has: r1's checkpoint and bitmaps beside r2's.
        assert {c.getName() for c in vm.dom.listAllCheckpoints()} == {"raksha-job-r1", "raksha-job-r2"}
        left = bitmaps(vm.dom)
        assert "raksha-job-r1" in left["vda"] and "raksha-job-r1" in left["vdb"]

        code, _ = vm.exec("dd if=/dev/urandom of=/dev/vdb bs=4096 count=4 seek=8 conv=fsync 2>/dev/null")
        assert code == 0
        third = backup_domains(conn, [vm.name], vault, "job", "r3", parent_run="r2")
        assert third.vms[0].error is None and third.vms[0].warnings == []  # nothing of r2 stays


def test_a_run_that_cannot_lock_the_vault_fails_whole_and_leaves_the_vm_as_it_was(conn: libvirt.virConnect,
                                                                                   tmp_path: Path) -> None:
    """A group's run takes one shared vault lock beside its point in time. When another holds the vault
    exclusively, the run fails with VAULT_LOCKED before a disk is stored: the guest is thawed, the pull job
    ended, this run's checkpoint and bitmaps dropped, and the next run is incremental from the last good one."""
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    vda = make_data_disk(tmp_path / "vda.qcow2", "16M")
    with GuestDomain(conn, build_guest(), [(vda, "qcow2")], tmp_path, name="raksha-locked") as vm:
        vm.wait_for_agent()
        assert backup_domains(conn, [vm.name], vault, "job", "r1").vms[0].error is None
        assert vm.dom is not None
        with vault.locks.acquire(LockKind.EXCLUSIVE, "offline repair"), pytest.raises(VaultLocked) as caught:
            backup_domains(conn, [vm.name], vault, "job", "r2", parent_run="r1")
        assert caught.value.code == "VAULT_LOCKED" and "offline repair" in caught.value.message
        assert vm.agent("guest-fsfreeze-status") == "thawed"
        assert vm.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
        assert [c.getName() for c in vm.dom.listAllCheckpoints()] == ["raksha-job-r1"]
        assert bitmaps(vm.dom) == {"vda": {"raksha-job-r1"}}
        assert [str(b) for b in vault.backup_ids()] == [f"job/r1/{vm.dom.UUIDString()}/vda"]
        assert vault.locks.active() == []

        (again,) = backup_domains(conn, [vm.name], vault, "job", "r2", parent_run="r1").vms
        assert again.error is None and [d.kind for d in again.disks] == ["incremental"]


def test_an_older_rakshas_fine_bitmap_goes_with_its_checkpoint(conn: libvirt.virConnect, tmp_path: Path) -> None:
    """Before ADR 0028 a qcow2 disk carried ``<checkpoint>~fine`` beside each checkpoint's bitmap. A run from
    such a checkpoint is incremental from it (at its 64 KiB) and, once good, leaves one 4 KiB bitmap: its own."""
    from raksha.hypervisor.qemu_blocks import qmp

    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    vda = make_data_disk(tmp_path / "vda.qcow2", "16M")
    with GuestDomain(conn, build_guest(), [(vda, "qcow2")], tmp_path, name="raksha-legacy") as vm:
        vm.wait_for_agent()
        assert vm.dom is not None
        assert backup_domains(conn, [vm.name], vault, "job", "r1").vms[0].error is None
        # r1's checkpoint made again as an older Raksha made it (the guest writes nothing meanwhile): libvirt's
        # own (64 KiB) and Raksha's ~fine beside it.
        vm.dom.checkpointLookupByName("raksha-job-r1").delete(0)
        (node,) = top_nodes(vm.dom).values()
        vm.dom.checkpointCreateXML("<domaincheckpoint><name>raksha-job-r1</name></domaincheckpoint>", 0)
        qmp(vm.dom, "block-dirty-bitmap-add", node=node["node-name"], name="raksha-job-r1~fine", granularity=4096,
            persistent=True)
        assert bitmaps(vm.dom) == {"vda": {"raksha-job-r1", "raksha-job-r1~fine"}}

        (r2,) = backup_domains(conn, [vm.name], vault, "job", "r2", parent_run="r1").vms
        assert r2.error is None and r2.warnings == []
        assert r2.disks[0].kind == "incremental" and "(64 KiB granularity)" in r2.disks[0].tracking
        assert [c.getName() for c in vm.dom.listAllCheckpoints()] == ["raksha-job-r2"]
        assert bitmaps(vm.dom) == {"vda": {"raksha-job-r2"}}

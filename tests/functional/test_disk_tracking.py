"""Changed-block tracking per disk, and what happens when it breaks (issue 4, items 5 and 6).

Data disks without a filesystem (so the test knows every byte: it writes 4 KiB blocks with
dd in the guest and applies the same writes to a reference copy on the host): a raw one, tracked
with non-persistent QEMU dirty bitmaps, and a qcow2 one, tracked with libvirt checkpoints refined by
Raksha's persistent 4 KiB bitmaps. Every restored point is compared byte for byte with the
reference of that point.
"""

from __future__ import annotations

import filecmp
import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, make_data_disk  # noqa: E402

from raksha.hypervisor import pull  # noqa: E402
from raksha.hypervisor.group_backup import GroupResult, VmResult, backup_domains  # noqa: E402
from raksha.hypervisor.lifecycle import undefine_domain  # noqa: E402
from raksha.hypervisor.qemu_blocks import node_bitmaps, qmp, top_nodes  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.progress import ProgressEvent  # noqa: E402
from raksha.vault.engine.restore import restore_backup  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.format.naming import BackupId  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402
from raksha.vault.sources.image_locks import image_in_use  # noqa: E402

BLOCK = 4096
RAW_SIZE = 32 << 20


class RawDisk:
    """A disk without a filesystem (the guest leaves it alone; raw or qcow2) and its host-side raw reference."""

    def __init__(self, path: Path, seed: int, fmt: str = "raw") -> None:
        self.path, self.ref = path, path.with_suffix(".ref")
        self.rng = random.Random(seed)
        with open(self.ref, "wb") as f:  # sparse, with a few data regions
            f.truncate(RAW_SIZE)
            for off in range(0, RAW_SIZE, 4 << 20):
                f.seek(off)
                f.write(self.rng.randbytes(256 << 10))
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(self.ref), str(path)], check=True)
        self.points: dict[str, Path] = {}  # run -> what the disk held at that run's point in time

    def write(self, vm: GuestDomain, dev: str, extents: int, blocks: int) -> int:
        """Write ``extents`` runs of ``blocks`` 4 KiB blocks at random places, in the guest and in the reference."""
        offsets = sorted(self.rng.sample(range(0, RAW_SIZE // BLOCK - blocks, blocks), extents))
        data = self.rng.randbytes(extents * blocks * BLOCK)
        per_call = max(1, (64 << 10) // (blocks * BLOCK))  # the agent parses small commands only
        for first in range(0, extents, per_call):
            script = ["cat > /run/blob"] + [
                f"dd if=/run/blob of=/dev/{dev} bs={BLOCK} skip={(i - first) * blocks} seek={o} count={blocks} "
                "conv=fsync 2>/dev/null" for i, o in enumerate(offsets) if first <= i < first + per_call
            ] + ["sync", "rm /run/blob"]
            part = data[first * blocks * BLOCK:(first + per_call) * blocks * BLOCK]
            code, _ = vm.exec(" && ".join(script), stdin=part)
            assert code == 0
        with open(self.ref, "r+b") as f:
            for i, o in enumerate(offsets):
                f.seek(o * BLOCK)
                f.write(data[i * blocks * BLOCK:(i + 1) * blocks * BLOCK])
        return len(data)

    def mark(self, run: str) -> None:
        self.points[run] = self.ref.with_suffix(f".{run}")
        shutil.copyfile(self.ref, self.points[run])


def disk(vm: VmResult, target: str):  # type: ignore[no-untyped-def]
    return next(d for d in vm.disks if d.target == target)


def check_restores(vault: Vault, tmp_path: Path, uuid: str, dev: str, raw: RawDisk) -> None:
    for run, expected in raw.points.items():
        out = tmp_path / f"restored-{uuid[:8]}-{dev}-{run}.raw"
        restore_backup(vault, BackupId.parse(f"job/{run}/{uuid}/{dev}"), str(out))
        assert filecmp.cmp(out, expected, shallow=False), f"{dev} of run {run} differs from what the guest held"
        out.unlink()


def new_vault(tmp_path: Path) -> Vault:
    return Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))


def restart(vm: GuestDomain) -> None:
    """Stop QEMU and start the persistent domain again (a new QEMU process)."""
    assert vm.dom is not None
    vm.dom.destroy()
    vm.dom.create()
    vm.wait_for_agent()


def image_bitmaps(path: Path) -> dict[str, list[str]]:
    """The persistent bitmaps stored in a qcow2 image and their flags (in-use, auto)."""
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True,
                                     text=True, check=True).stdout)
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"].get("bitmaps", [])}


def leave_in_use(path: Path) -> None:
    """Open the image read-write and kill the opener, as a crashed QEMU would: its bitmaps stay flagged in-use."""
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(path), "-c", "sleep 60000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not all("in-use" in flags for flags in image_bitmaps(path).values()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_raw_disk_incrementals_and_every_lost_base_downgrading_to_full(conn: libvirt.virConnect, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    vault = new_vault(tmp_path)
    vda = make_data_disk(tmp_path / "vda.qcow2", "32M")
    raw = RawDisk(tmp_path / "vdb.raw", seed=1)
    plain = RawDisk(tmp_path / "vdd.qcow2", seed=2, fmt="qcow2")  # qcow2, no filesystem: every byte known
    # vdc: a qcow2 overlay on a base image; with a backing chain libvirt itself judges the bitmap.
    base = make_data_disk(tmp_path / "base.qcow2", "32M")
    vdc = tmp_path / "vdc.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(vdc)], check=True)
    vm = GuestDomain(conn, build_guest(), [(vda, "qcow2"), (raw.path, "raw"), (vdc, "qcow2"),
                                            (plain.path, "qcow2")], tmp_path,
                     name="raksha-track")
    vm.dom = conn.defineXML(vm.xml)  # persistent: its checkpoints outlive a QEMU restart
    vm.dom.create()
    runs: dict[str, GroupResult] = {}
    written: dict[str, int] = {}
    written_q: dict[str, int] = {}
    with vm:
        vm.wait_for_agent()

        def run(name: str, parent: str | None, extents: int = 0, retire: tuple[str, ...] = ()) -> VmResult:
            if extents:
                written[name] = raw.write(vm, "vdb", extents, 4)
                written_q[name] = plain.write(vm, "vdd", extents, 1)  # 4 KiB writes: 1/16 of a qcow2 cluster
            runs[name] = backup_domains(conn, [vm.name], vault, "job", name, parent_run=parent, retire_runs=retire)
            raw.mark(name)
            plain.mark(name)
            (result,) = runs[name].vms
            assert result.error is None
            return result

        r1 = run("r1", None)
        assert disk(r1, "vdb").kind == "full" and disk(r1, "vdb").method == "qemu-dirty-bitmap"
        # A restore would never write over them while the VM runs: QEMU's image locks say it has them open.
        assert image_in_use(str(raw.path)) and image_in_use(str(plain.path))
        assert "starts tracking" in disk(r1, "vdb").tracking

        r2 = run("r2", "r1", extents=40)  # 40 x 16 KiB = 640 KiB
        vdb = disk(r2, "vdb")
        assert vdb.kind == "incremental" and "QEMU dirty bitmap raksha-job-r1" in vdb.tracking
        assert written["r2"] <= vdb.bytes_read <= 1.1 * written["r2"] + (64 << 10)  # reads what changed
        assert disk(r2, "vda").kind == "incremental" and disk(r2, "vdc").kind == "incremental"
        vdd = disk(r2, "vdd")  # libvirt's 64 KiB bitmap would read 16 x; the run's own 4 KiB one reads what changed
        assert vdd.kind == "incremental" and "checkpoint raksha-job-r1 dirty bitmap (4 KiB granularity)" in vdd.tracking
        assert written_q["r2"] <= vdd.bytes_read <= 1.1 * written_q["r2"] + (64 << 10)

        restart(vm)  # QEMU restarted: the raw disk's bitmap is gone, the checkpoint's is in the qcow2
        r3 = run("r3", "r2", extents=10)
        assert disk(r3, "vdb").kind == "full" and "QEMU was restarted" in disk(r3, "vdb").tracking
        assert disk(r3, "vda").kind == "incremental"
        vdd = disk(r3, "vdd")  # the checkpoint's bitmap is persistent: it survived the restart in the image
        assert vdd.kind == "incremental" and "checkpoint raksha-job-r2 dirty bitmap (4 KiB" in vdd.tracking
        assert written_q["r3"] <= vdd.bytes_read <= 1.1 * written_q["r3"] + (64 << 10)
        r4 = run("r4", "r3", extents=10)
        assert disk(r4, "vdb").kind == "incremental" and disk(r4, "vda").kind == "incremental"
        assert written["r4"] <= disk(r4, "vdb").bytes_read <= 1.1 * written["r4"] + (64 << 10)

        # The checkpoint's bitmap removed behind Raksha's back while the VM is shut off.
        vm.dom.destroy()
        for image in (vda, vdc):
            subprocess.run(["qemu-img", "bitmap", "--remove", str(image), "raksha-job-r4"], check=True)
        vm.dom.create()
        vm.wait_for_agent()
        r5 = run("r5", "r4", extents=5)
        assert disk(r5, "vda").kind == "full" and "bitmap is missing" in disk(r5, "vda").tracking
        assert disk(r5, "vdc").kind == "full" and "libvirt refused the incremental" in disk(r5, "vdc").tracking
        assert disk(r5, "vdb").kind == "full"
        r6 = run("r6", "r5", extents=5)
        assert {d.target: d.kind for d in r6.disks} == {"vda": "incremental", "vdb": "incremental",
                                                        "vdc": "incremental", "vdd": "incremental"}

        # A crash left the checkpoint's bitmap flagged in-use: QEMU loads it as inconsistent.
        vm.dom.destroy()
        assert sorted(image_bitmaps(vda)) == sorted(image_bitmaps(vdc)) == ["raksha-job-r6"]
        leave_in_use(vda)
        vm.dom.create()
        vm.wait_for_agent()
        r7 = run("r7", "r6", extents=5)
        assert disk(r7, "vda").kind == "full" and "inconsistent" in disk(r7, "vda").tracking
        r8 = run("r8", "r7", extents=5)
        assert disk(r8, "vda").kind == "incremental" and disk(r8, "vdb").kind == "incremental"
        assert [c.getName() for c in vm.dom.listAllCheckpoints()] == ["raksha-job-r8"]

        # libvirt refuses this run's checkpoint (made beside the reads): the backup is good all the same,
        # incremental from r8's, and warns that the next run reads the qcow2 disks whole. That one does, and
        # tracks them again.
        made = libvirt.virDomain.checkpointCreateXML

        def refused(_dom: libvirt.virDomain, _xml: str, _flags: int = 0) -> None:
            # As libvirt's API does on entry: without it the error takes its message from the thread's last
            # libvirt error, which in a kept thread (ADR 0027) may be an earlier task's (the hook probe's).
            libvirt.virResetLastError()
            raise libvirt.libvirtError("checkpoint refused by the test")

        monkeypatch.setattr(libvirt.virDomain, "checkpointCreateXML", refused)
        # ...and vda's bitmap of the run, which no checkpoint owns now, cannot be removed either.
        vda_node = top_nodes(vm.dom)["vda"]["node-name"]
        real_try = pull.try_qmp
        monkeypatch.setattr(pull, "try_qmp", lambda dom, command, **kw: False if kw.get("name") == "raksha-job-r8b"
                            and kw.get("node") == vda_node else real_try(dom, command, **kw))
        r8b = run("r8b", "r8", extents=5)
        monkeypatch.setattr(libvirt.virDomain, "checkpointCreateXML", made)
        monkeypatch.setattr(pull, "try_qmp", real_try)
        assert {d.kind for d in r8b.disks} == {"incremental"}
        assert r8b.error is None and r8b.warnings == [
            f"{vm.name}: checkpoint raksha-job-r8b could not be made: checkpoint refused by the test; "
            "the next run reads its qcow2 disks whole"]
        assert disk(r8b, "vdb").kind == "incremental" and vm.dom.listAllCheckpoints() == []
        assert "raksha-job-r8b" in node_bitmaps(top_nodes(vm.dom)["vda"])  # a stray, costing vda's writes
        r8c = run("r8c", "r8b", extents=5)
        assert {d.target: d.kind for d in r8c.disks} == {"vda": "full", "vdb": "incremental",
                                                         "vdc": "full", "vdd": "full"}
        assert "checkpoint raksha-job-r8b missing" in disk(r8c, "vda").tracking
        assert [c.getName() for c in vm.dom.listAllCheckpoints()] == ["raksha-job-r8c"]
        assert set(node_bitmaps(top_nodes(vm.dom)["vda"])) == {"raksha-job-r8c"}  # the good run removed it

        # A full run starts a new chain: once it succeeded, the old chain's checkpoint and bitmaps are gone.
        r9 = run("r9", None, extents=5, retire=("r8c",))
        assert {d.kind for d in r9.disks} == {"full"}
        assert [c.getName() for c in vm.dom.listAllCheckpoints()] == ["raksha-job-r9"]
        (vdb_node,) = [dev["inserted"] for dev in qmp(vm.dom, "query-block")
                       if dev.get("inserted", {}).get("file", "").endswith("vdb.raw")]
        assert [b["name"] for b in vdb_node.get("dirty-bitmaps", [])] == ["raksha-job-r9"]
        vm.dom.destroy()
        assert not image_in_use(str(raw.path)) and not image_in_use(str(plain.path))
        # No stale or inconsistent bitmap left behind.
        for image in (vda, vdc, plain.path):
            assert sorted(image_bitmaps(image)) == ["raksha-job-r9"], image

        # Undefine keeps working with checkpoints (a plain undefine is refused).
        with pytest.raises(libvirt.libvirtError, match="checkpoint"):
            vm.dom.undefine()
        assert undefine_domain(vm.dom) == ["raksha-job-r9"]
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(vm.name)
        uuid = r1.uuid

    check_restores(vault, tmp_path, uuid, "vdb", raw)
    check_restores(vault, tmp_path, uuid, "vdd", plain)
    meta = vault.read_metadata(BackupId.parse(f"job/r3/{uuid}/vdb"))
    assert meta["hints"]["tracking_method"] == "qemu-dirty-bitmap" and "restarted" in meta["hints"]["tracking"]


def test_guest_destroyed_mid_run_fails_alone_and_the_next_run_is_right(conn: libvirt.virConnect,
                                                                        tmp_path: Path) -> None:
    vault = new_vault(tmp_path)
    guest = build_guest()
    a_vda = make_data_disk(tmp_path / "a.qcow2", "32M")
    a_raw, b_raw = RawDisk(tmp_path / "a-vdb.raw", seed=2), RawDisk(tmp_path / "b-vda.raw", seed=3)
    a_disks = [(a_vda, "qcow2"), (a_raw.path, "raw")]
    a_uuid = "5a7e0000-0000-4000-8000-00000000000a"  # the same VM when it comes back

    def doomed() -> GuestDomain:
        vm = GuestDomain(conn, guest, a_disks, tmp_path, name="raksha-doomed")
        vm.xml = vm.xml.replace("<name>", f"<uuid>{a_uuid}</uuid><name>", 1)
        return vm

    # The survivor's disk is a block device (a loop device over its file), as a Cinder LVM or iSCSI volume is.
    loop = subprocess.run(["losetup", "-f", "--show", str(b_raw.path)], capture_output=True, text=True,
                          check=True).stdout.strip()
    survivor = GuestDomain(conn, guest, [(Path(loop), "raw")], tmp_path, name="raksha-survivor")
    survivor.xml = survivor.xml.replace("<disk type='file'", "<disk type='block'").replace(
        f"<source file='{loop}'/>", f"<source dev='{loop}'/>")
    try:
        with survivor as b:
            with doomed() as a:
                a.wait_for_agent()
                b.wait_for_agent()
                assert a.dom is not None and b.dom is not None
                names = [a.name, b.name]
                backup_domains(conn, names, vault, "job", "r1")
                a_raw.mark("r1")
                b_raw.mark("r1")

                a_raw.write(a, "vdb", 32, 16)  # 2 MiB: still being read when the guest goes
                b_raw.write(b, "vda", 20, 4)

                def destroy_a(vm: str, target: str, event: ProgressEvent) -> None:
                    if vm == a.name and a.dom is not None and a.dom.isActive():
                        a.dom.destroy()

                r2 = backup_domains(conn, names, vault, "job", "r2", parent_run="r1", progress=destroy_a)
                b_raw.mark("r2")
                res = {vm.name: vm for vm in r2.vms}
                error = res[a.name].error
                assert error is not None and error["code"] == "VM_GONE" and "destroyed" in error["message"]
                assert res[b.name].error is None and disk(res[b.name], "vda").kind == "incremental"
                assert b.agent("guest-fsfreeze-status") == "thawed"
                assert b.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE  # no dangling pull job
                assert b.dom.listAllCheckpoints() == []  # all raw: its bitmaps are QEMU's, no checkpoint of nothing
                assert not vault.backup_ids(f"job/r2/{a_uuid}")

            # The doomed VM comes back (a new QEMU): the next run reads it in full, the survivor incrementally.
            with doomed() as a:
                a.wait_for_agent()
                a_raw.write(a, "vdb", 8, 4)
                b_raw.write(b, "vda", 8, 4)
                r3 = backup_domains(conn, [a.name, b.name], vault, "job", "r3", parent_run="r2")
                a_raw.mark("r3")
                b_raw.mark("r3")
                res = {vm.name: vm for vm in r3.vms}
                assert all(vm.error is None for vm in r3.vms)
                assert disk(res[a.name], "vdb").kind == "full" and disk(res[a.name], "vda").kind == "full"
                assert disk(res[b.name], "vda").kind == "incremental"
                assert disk(res[b.name], "vda").method == "qemu-dirty-bitmap"
                b_uuid = res[b.name].uuid
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)

    check_restores(vault, tmp_path, a_uuid, "vdb", a_raw)
    check_restores(vault, tmp_path, b_uuid, "vda", b_raw)


def test_the_checkpoint_made_beside_the_reads_marks_the_writes_made_before_it(
        conn: libvirt.virConnect, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's libvirt checkpoint is made after its point in time, while the disks are read, over the 4 KiB
    bitmap the run added before the point (ADR 0028). The guest writes in between: the next run, incremental
    from that checkpoint, reads them, and each point restores exactly what the guest held. A bitmap that is
    gone by then has libvirt refuse the checkpoint: the backup is good, warns, and the next run reads whole."""
    vault = new_vault(tmp_path)
    plain = RawDisk(tmp_path / "vda.qcow2", seed=3, fmt="qcow2")
    made_after = pull._make_checkpoint_after
    gap: dict[str, int] = {}

    with GuestDomain(conn, build_guest(), [(plain.path, "qcow2")], tmp_path, name="raksha-late-cp") as vm:
        vm.wait_for_agent()
        backup_domains(conn, [vm.name], vault, "job", "r1")
        plain.mark("r1")
        plain.write(vm, "vda", 6, 4)

        def write_first(p: pull.DomainPoint) -> None:
            plain.mark("r2")  # what the point in time holds: the gap's writes come after it
            gap["bytes"] = plain.write(vm, "vda", 6, 4)
            made_after(p)

        monkeypatch.setattr(pull, "_make_checkpoint_after", write_first)
        (r2,) = backup_domains(conn, [vm.name], vault, "job", "r2", parent_run="r1").vms
        monkeypatch.setattr(pull, "_make_checkpoint_after", made_after)
        assert r2.error is None and r2.warnings == [] and disk(r2, "vda").kind == "incremental"
        assert gap["bytes"] == 6 * 4 * BLOCK
        assert [c.getName() for c in vm.dom.listAllCheckpoints()] == ["raksha-job-r2"]
        (node,) = [dev["inserted"] for dev in qmp(vm.dom, "query-block") if dev.get("inserted")]
        # One bitmap per disk: the checkpoint's is the run's own, at 4 KiB.
        assert [(b["name"], b["granularity"]) for b in node["dirty-bitmaps"]] == [("raksha-job-r2", 4096)]

        (r3,) = backup_domains(conn, [vm.name], vault, "job", "r3", parent_run="r2").vms
        plain.mark("r3")
        assert r3.error is None and disk(r3, "vda").kind == "incremental"
        assert "checkpoint raksha-job-r2 dirty bitmap (4 KiB granularity)" in disk(r3, "vda").tracking
        assert gap["bytes"] <= disk(r3, "vda").bytes_read <= 1.1 * gap["bytes"] + (64 << 10)

        # The run's bitmap is gone before its checkpoint is made: libvirt checks the image and refuses it.
        def bitmap_lost(p: pull.DomainPoint) -> None:
            qmp(vm.dom, "block-dirty-bitmap-remove", node=node["node-name"], name=p.checkpoint)
            made_after(p)

        plain.write(vm, "vda", 3, 4)
        monkeypatch.setattr(pull, "_make_checkpoint_after", bitmap_lost)
        (r4,) = backup_domains(conn, [vm.name], vault, "job", "r4", parent_run="r3").vms
        monkeypatch.setattr(pull, "_make_checkpoint_after", made_after)
        plain.mark("r4")
        assert r4.error is None and disk(r4, "vda").kind == "incremental"
        (warning,) = r4.warnings
        assert warning.startswith(f"{vm.name}: checkpoint raksha-job-r4 could not be made: ")
        assert warning.endswith("the next run reads its qcow2 disks whole") and "raksha-job-r4" in warning
        assert vm.dom.listAllCheckpoints() == []
        (r5,) = backup_domains(conn, [vm.name], vault, "job", "r5", parent_run="r4").vms
        plain.mark("r5")
        assert disk(r5, "vda").kind == "full" and "checkpoint raksha-job-r4 missing" in disk(r5, "vda").tracking
        assert [c.getName() for c in vm.dom.listAllCheckpoints()] == ["raksha-job-r5"]
    check_restores(vault, tmp_path, r2.uuid, "vda", plain)

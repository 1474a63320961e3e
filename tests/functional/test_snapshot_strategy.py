"""The seed's strategy (external snapshots) for hosts without checkpoints: ``backup_domains(strategy="snapshot")``.

Two running guests, each with two ext4 disks (one of the four raw), in one consistency group.
Every disk keeps exactly one Raksha overlay between runs; its clusters are the next incremental's
changed extents, for the raw disk too. Each restored point must be bit-identical to the frozen
layer hashed during the run, and to the base after the run's commit (which holds exactly the
point in time once the older overlay is committed into it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, debugfs_cat, make_data_disk  # noqa: E402

import raksha.hypervisor.group_backup as group_backup  # noqa: E402
import raksha.hypervisor.snapshot as snapshot  # noqa: E402
from conftest import MIB, blake3_file  # noqa: E402
from raksha.domain.errors import SourceError  # noqa: E402
from raksha.hypervisor.group_backup import GroupResult, backup_domains  # noqa: E402
from raksha.hypervisor.pull import FILESYSTEM  # noqa: E402
from raksha.hypervisor.snapshot import disk_chains, snapshot_group  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.restore import restore_backup  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.format.naming import BackupId  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402

WRITE = 1 * MIB  # per disk between runs


@dataclass
class Group:
    a: GuestDomain
    b: GuestDomain
    dir: Path
    vault: Vault
    bases: dict[tuple[str, str], tuple[Path, str]]  # (vm, target) -> (base image, format)

    @property
    def names(self) -> list[str]:
        return [self.a.name, self.b.name]

    def guest(self, name: str) -> GuestDomain:
        return self.a if name == self.a.name else self.b

    def chain(self, vm: str, target: str) -> list[str]:
        dom = self.guest(vm).dom
        assert dom is not None
        return [layer.path for layer in disk_chains(dom.XMLDesc(0))[target]]

    def overlays(self) -> list[str]:
        return sorted(p.name for p in self.dir.glob("*.raksha-*"))

    def run(self, job: str, run: str, parent: str | None = None, **kw: Any) -> GroupResult:
        return backup_domains(self.a.conn, self.names, self.vault, job, run, parent_run=parent,
                              strategy="snapshot", **kw)


@pytest.fixture(scope="module")
def group(conn: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    d = tmp_path_factory.mktemp("snapshot-strategy")
    guest = build_guest()
    tag = uuid.uuid4().hex[:6]
    disks = {"a": [(make_data_disk(d / "a-vda.qcow2", "64M"), "qcow2"),
                   (make_data_disk(d / "a-vdb.raw", "64M", fmt="raw"), "raw")],
             "b": [(make_data_disk(d / "b-vda.qcow2", "64M"), "qcow2"),
                   (make_data_disk(d / "b-vdb.qcow2", "64M"), "qcow2")]}
    vault = Vault.init(LocalBackend(d / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    with GuestDomain(conn, guest, disks["a"], d, name=f"raksha-snap-a-{tag}") as a, \
            GuestDomain(conn, guest, disks["b"], d, name=f"raksha-snap-b-{tag}") as b:
        a.wait_for_agent()
        b.wait_for_agent()
        bases = {(g.name, f"vd{chr(ord('a') + i)}"): (path, fmt)
                 for g, key in ((a, "a"), (b, "b")) for i, (path, fmt) in enumerate(disks[key])}
        yield Group(a, b, d, vault, bases)


def write(g: GuestDomain, dev: str, name: str, size: int = WRITE) -> str:
    """``size`` random bytes written in the guest to /mnt/<dev>/<name>; returns their sha256."""
    code, out = g.exec(f"dd if=/dev/urandom of=/mnt/{dev}/{name} bs=64k count={size >> 16} 2>/dev/null && sync "
                       f"&& sha256sum /mnt/{dev}/{name}")
    assert code == 0, out
    return out.split()[0].decode()


def digest(image: Path, fmt: str, scratch: Path) -> str:
    """The blake3 of an image's guest-visible bytes (qemu-img reads it while the VM runs: -U)."""
    out = scratch / f"digest-{os.urandom(6).hex()}.raw"  # VMs are transferred side by side: one file each
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(out)], check=True)
    try:
        return blake3_file(out)
    finally:
        out.unlink()


def backing_file(image: Path) -> str:
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True, text=True,
                          check=True)
    return str(json.loads(info.stdout).get("backing-filename", ""))


def disks_of(result: GroupResult) -> dict[tuple[str, str], Any]:
    return {(vm.name, d.target): d for vm in result.vms for d in vm.disks}


def sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_full_and_two_incrementals_restore_every_point_bit_exact(group: Group,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    points: dict[str, dict[tuple[str, str], str]] = {}  # run -> disk -> digest of its point in time
    frozen: dict[str, dict[tuple[str, str], str]] = {}  # the same, taken from the frozen layer during the run
    files: dict[str, dict[tuple[str, str], str]] = {}  # run -> disk -> sha256 of the file written before it
    results = {}
    parent = None
    real = group_backup.backup_disk

    def hash_frozen_layer_then_back_up(vault: Vault, source: Any, bid: BackupId, **kw: Any) -> Any:
        vm, t = source.path.split(":")
        layer = disk_chains(group.guest(vm).dom.XMLDesc(0))[t][1]  # below the run's new overlay
        frozen[bid.run][(vm, t)] = digest(Path(layer.path), layer.format, group.dir)
        return real(vault, source, bid, **kw)

    monkeypatch.setattr(group_backup, "backup_disk", hash_frozen_layer_then_back_up)
    for run in ("r1", "r2", "r3"):
        if parent is not None:
            files[run] = {(vm, t): write(group.guest(vm), t, f"{run}.bin") for vm, t in group.bases}
        frozen[run] = {}
        results[run] = res = group.run("grp", run, parent)
        assert all(vm.error is None for vm in res.vms), [vm.error for vm in res.vms]
        assert {vm.consistency for vm in res.vms} == {FILESYSTEM} and res.freeze_ms > 0
        # One overlay per disk, named after the run, on its base: the chain does not grow.
        for (vm, t), (base, _fmt) in group.bases.items():
            assert group.chain(vm, t) == [f"{base}.raksha-grp-{run}.qcow2", str(base)]
        assert group.overlays() == sorted(f"{base.name}.raksha-grp-{run}.qcow2" for base, _ in group.bases.values())
        # The overlay's own header names the base (what a restart of the domain opens), and the old
        # overlay is committed: the base is now exactly the run's point in time.
        for base, _fmt in group.bases.values():
            assert backing_file(Path(f"{base}.raksha-grp-{run}.qcow2")) == str(base)
        points[run] = {k: digest(base, fmt, group.dir) for k, (base, fmt) in group.bases.items()}
        assert points[run] == frozen[run]
        parent = run

    for key, d in disks_of(results["r1"]).items():
        assert d.kind == "full" and "starts tracking" in d.tracking and d.method == "snapshot-overlay", key
    for run in ("r2", "r3"):
        for key, d in disks_of(results[run]).items():
            assert d.kind == "incremental" and d.method == "snapshot-overlay", (run, key, d.tracking)
            assert f"since run {'r1' if run == 'r2' else 'r2'}" in d.tracking
            # What the guest wrote (1 MiB) plus the ext4 metadata and journal blocks around it, in
            # 64 KiB qcow2 clusters: not the 64 MiB disk.
            assert WRITE <= d.bytes_read <= 3 * WRITE, (run, key, d.bytes_read)

    uuids = {vm.name: vm.uuid for vm in results["r1"].vms}
    for i, run in enumerate(("r1", "r2", "r3")):
        for (vm, t), want in points[run].items():
            out = group.dir / f"restored-{run}-{vm}-{t}.raw"
            restore_backup(group.vault, BackupId("grp", run, uuids[vm], t), str(out))
            assert blake3_file(out) == want, (run, vm, t)
            for j, earlier in enumerate(("r2", "r3")):
                content = debugfs_cat(out, f"/{earlier}.bin")
                assert (sha256(content) == files[earlier][(vm, t)]) if j + 1 <= i else content == b""
            out.unlink()
    a_vdb = disks_of(results["r2"])[(group.a.name, "vdb")]
    assert a_vdb.kind == "incremental"  # the raw disk too
    print(f"\nincremental bytes read per disk (written {WRITE}):",
          {run: sorted(d.bytes_read for d in disks_of(results[run]).values()) for run in ("r2", "r3")},
          "freeze ms:", [round(results[r].freeze_ms) for r in ("r1", "r2", "r3")])


def test_an_overlay_committed_behind_its_back_downgrades_that_disk_to_full(group: Group) -> None:
    first = group.run("lost", "r1")  # collapses whatever another job left: still one overlay per disk
    assert all(vm.error is None for vm in first.vms)
    assert all(len(group.chain(vm, t)) == 2 for vm, t in group.bases)
    # Someone runs `virsh blockcommit --active --pivot --delete` on a's raw disk.
    dom = group.a.dom
    assert dom is not None
    overlay = group.chain(group.a.name, "vdb")[0]
    dom.blockCommit("vdb", None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
    for _ in range(500):
        info = dom.blockJobInfo("vdb", 0)
        if info and info["cur"] == info["end"]:
            try:
                dom.blockJobAbort("vdb", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                break
            except libvirt.libvirtError:
                pass
        import time

        time.sleep(0.02)
    os.unlink(overlay)
    write(group.a, "vdb", "lost.bin", 256 << 10)

    second = group.run("lost", "r2", "r1")
    disks = disks_of(second)
    lost = disks[(group.a.name, "vdb")]
    assert lost.kind == "full" and "overlay a-vdb.raw.raksha-lost-r1.qcow2 of run r1 is not in" in lost.tracking
    assert all(d.kind == "incremental" for k, d in disks.items() if k != (group.a.name, "vdb"))
    assert all(len(group.chain(vm, t)) == 2 for vm, t in group.bases)  # the tracking is set up again
    base, fmt = group.bases[(group.a.name, "vdb")]
    out = group.dir / "lost.raw"
    restore_backup(group.vault, BackupId("lost", "r2", second.vms[0].uuid, "vdb"), str(out))
    assert blake3_file(out) == digest(base, fmt, group.dir)
    out.unlink()

    # The seed's pure mode: read, then everything is committed back; no overlay stays.
    pure = group.run("lost", "r3", "r2", snapshot_options={"keep_overlay": False})
    assert all(d.kind == "incremental" and "pure mode" in d.tracking for d in disks_of(pure).values())
    assert all(group.chain(vm, t) == [str(group.bases[(vm, t)][0])] for vm, t in group.bases)
    assert group.overlays() == []
    again = group.run("lost", "r4", "r3", snapshot_options={"keep_overlay": False})
    assert all(d.kind == "full" and d.method == "none" for d in disks_of(again).values())
    assert group.overlays() == []


def qemu_nbd_pids(image: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"qemu-nbd" and image.encode() in argv:
            pids.append(int(entry))
    return pids


def test_a_failure_mid_run_rolls_the_overlays_back_and_leaves_the_guests_running(
        group: Group, monkeypatch: pytest.MonkeyPatch) -> None:
    group.run("fail", "r1")
    before = {k: group.chain(*k) for k in group.bases}
    write(group.a, "vda", "fail.bin", 256 << 10)
    write(group.b, "vda", "fail.bin", 256 << 10)

    real = group_backup.backup_disk
    killed = []

    def read_then_die(vault: Vault, source: Any, bid: BackupId, **kw: Any) -> Any:
        if source.path == f"{group.a.name}:vda":  # the read of a's frozen layer dies under it
            below = group.chain(group.a.name, "vda")[1]
            for pid in qemu_nbd_pids(below):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return real(vault, source, bid, **kw)

    monkeypatch.setattr(group_backup, "backup_disk", read_then_die)
    res = group.run("fail", "r2", "r1")
    monkeypatch.undo()
    assert killed
    vms = {vm.name: vm for vm in res.vms}
    assert vms[group.a.name].error is not None and vms[group.a.name].error["code"] == "SOURCE_IO"
    assert vms[group.b.name].error is None
    # a is as run r1 left it (its writes since are kept in the r1 overlay); b moved on to r2.
    for (vm, t), chain in before.items():
        if vm == group.a.name:
            assert group.chain(vm, t) == chain
        else:
            assert group.chain(vm, t) == [chain[1] + ".raksha-fail-r2.qcow2", chain[1]]
    assert not [o for o in group.overlays() if o.startswith("a-") and "fail-r2" in o]

    # An exception out of the run rolls every domain back.
    assert group.a.dom is not None and group.b.dom is not None
    mid = {k: group.chain(*k) for k in group.bases}
    with pytest.raises(RuntimeError), snapshot_group([group.a.dom, group.b.dom], "fail", "r3", "r2") as point:
        assert all(len(group.chain(*k)) == 3 for k in group.bases)
        point.domains[0].source(point.domains[0].disks[0]).pread(0, 65536)
        raise RuntimeError("the vault went away")
    assert {k: group.chain(*k) for k in group.bases} == mid
    assert not [o for o in group.overlays() if "fail-r3" in o]
    for g in (group.a, group.b):
        assert g.agent("guest-fsfreeze-status") == "thawed"
        assert g.exec("echo alive > /mnt/vda/alive && sync")[0] == 0
        # The guest's writes since r1 survived the rollbacks.
        assert g.exec("stat -c %s /mnt/vda/fail.bin")[1].strip() == str(256 << 10).encode()


MID_TRANSFER = """
import sys, time, libvirt
from raksha.hypervisor.snapshot import snapshot_group
conn = libvirt.open("qemu:///system")
with snapshot_group([conn.lookupByName(n) for n in sys.argv[1:]], "kill", "r2", "r1") as point:
    p = point.domains[0]
    p.source(p.disks[0]).pread(0, 65536)
    print("transferring", flush=True)
    time.sleep(600)
"""


def test_a_run_killed_mid_transfer_is_collapsed_by_the_next_which_stays_incremental(group: Group) -> None:
    group.run("kill", "r1")
    write(group.a, "vda", "kill1.bin", 256 << 10)
    proc = subprocess.Popen([sys.executable, "-c", MID_TRANSFER, *group.names], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "transferring"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The dead run left its overlays on top and a qemu-nbd export holding a's frozen layer.
    assert all(len(group.chain(vm, t)) == 3 for vm, t in group.bases)
    frozen_layer = group.chain(group.a.name, "vda")[1]
    assert qemu_nbd_pids(frozen_layer)
    assert all(g.agent("guest-fsfreeze-status") == "thawed" for g in (group.a, group.b))
    write(group.a, "vda", "kill2.bin", 256 << 10)

    res = group.run("kill", "r3", "r1")
    assert all(vm.error is None for vm in res.vms)
    assert not qemu_nbd_pids(frozen_layer)  # the dead run's export was stopped so the commit could go on
    for (vm, t), d in disks_of(res).items():
        # The changes since r1 are in the r1 overlay and in the one the dead run put above it.
        assert d.kind == "incremental" and "1 overlay(s) an interrupted run left" in d.tracking, (vm, t, d.tracking)
        base, fmt = group.bases[(vm, t)]
        assert group.chain(vm, t) == [f"{base}.raksha-kill-r3.qcow2", str(base)]
        out = group.dir / "kill.raw"
        restore_backup(group.vault, BackupId("kill", "r3", res.vms[0 if vm == group.a.name else 1].uuid, t), str(out))
        assert blake3_file(out) == digest(base, fmt, group.dir), (vm, t)
        if (vm, t) == (group.a.name, "vda"):
            assert len(debugfs_cat(out, "/kill1.bin")) == len(debugfs_cat(out, "/kill2.bin")) == 256 << 10
            assert d.bytes_read < 4 * (256 << 10) * 2
        out.unlink()
    assert not [o for o in group.overlays() if "kill-r2" in o]

    # A run that died in its rollback: the active commit of a's overlay started, its pivot never came.
    dom = group.a.dom
    assert dom is not None
    shallow = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
    dom.blockCommit("vda", None, None, 0, shallow)
    assert dom.blockJobInfo("vda", 0)
    res = group.run("kill", "r4", "r3")  # pivots the job first; a snapshot would fail beside it
    assert all(vm.error is None for vm in res.vms)
    vda = disks_of(res)[(group.a.name, "vda")]
    assert vda.kind == "full" and "is not in the disk's chain" in vda.tracking
    assert all(len(group.chain(vm, t)) == 2 for vm, t in group.bases) and not dom.blockJobInfo("vda", 0)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An ext4 image attached to a loop block device (needs root and /dev/loop*)."""
    image = make_data_disk(tmp_path / "blk.raw", "64M", fmt="raw")
    done = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"no loop device here: {done.stderr.strip()}")
    dev = done.stdout.strip()
    try:
        yield dev, image
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_block_device_gets_changed_block_incrementals(conn: Any, tmp_path: Path,
                                                        loop_device: tuple[str, Path]) -> None:
    dev, _image = loop_device
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    g = GuestDomain(conn, build_guest(), [(make_data_disk(tmp_path / "vda.qcow2", "64M"), "qcow2"),
                                          (_image, "raw")], tmp_path, name=f"raksha-snap-blk-{uuid.uuid4().hex[:6]}")
    file_disk = f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{_image}'/>"
    assert file_disk in g.xml
    g.xml = g.xml.replace(file_disk, f"<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
                                     f"<source dev='{dev}'/>")
    options = {"overlay_dir": str(overlays)}
    with g:
        g.wait_for_agent()
        assert g.dom is not None
        backup_domains(conn, [g.name], vault, "blk", "r1", strategy="snapshot", snapshot_options=options)
        sha = write(g, "vdb", "blk.bin", 512 << 10)
        res = backup_domains(conn, [g.name], vault, "blk", "r2", parent_run="r1", strategy="snapshot",
                             snapshot_options=options)
        vdb = next(d for d in res.vms[0].disks if d.target == "vdb")
        assert vdb.kind == "incremental" and vdb.method == "snapshot-overlay", vdb.tracking
        assert 512 << 10 <= vdb.bytes_read <= 3 * (512 << 10)
        chain = [layer.path for layer in disk_chains(g.dom.XMLDesc(0))["vdb"]]
        assert chain == [str(overlays / f"{os.path.basename(dev)}.raksha-blk-r2.qcow2"), dev]
        out = tmp_path / "vdb.raw"
        restore_backup(vault, BackupId("blk", "r2", res.vms[0].uuid, "vdb"), str(out))
        assert blake3_file(out) == digest(Path(dev), "raw", tmp_path)
        assert sha256(debugfs_cat(out, "/blk.bin")) == sha


def test_a_commit_that_fails_after_a_good_backup_is_a_warning_on_its_vm(group: Group,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The backup is in the vault, so the run is good; the layer left uncommitted is said on the VM, and the
    next run collapses it."""
    group.run("warn", "r1")
    write(group.a, "vda", "warn.bin", 128 << 10)
    real = snapshot._commit
    failed = []

    def commit_fails_once(dom: Any, target: str, *args: Any, **kw: Any) -> None:
        if dom.name() == group.a.name and target == "vda" and not failed:
            failed.append(target)
            raise SourceError("block commit refused (injected)")
        real(dom, target, *args, **kw)

    monkeypatch.setattr(snapshot, "_commit", commit_fails_once)
    res = group.run("warn", "r2", "r1")
    monkeypatch.undo()
    vms = {vm.name: vm for vm in res.vms}
    assert all(vm.error is None for vm in res.vms) and failed == ["vda"]
    (warning,) = vms[group.a.name].warnings
    assert warning.startswith(f"{group.a.name}:vda: committing the old layers failed, left for the next run")
    assert "injected" in warning and vms[group.b.name].warnings == []
    assert len(group.chain(group.a.name, "vda")) == 3  # base <- r1's overlay <- r2's: not collapsed

    res = group.run("warn", "r3", "r2")
    assert all(vm.error is None and vm.warnings == [] for vm in res.vms)
    assert disks_of(res)[(group.a.name, "vda")].kind == "incremental"
    assert all(len(group.chain(vm, t)) == 2 for vm, t in group.bases)

"""Issue 4's scenario end to end: two running guests, one consistency group, full + two incrementals,
every point restored to files and to new domains; once with the pull strategy (checkpoints), once with
the seed's snapshot strategy.

Each guest has a boot disk (a qcow2 overlay on a base image the two share) and a data disk; guest A's
data disk is raw. Between runs each guest writes fresh random files on both disks (``dd`` in the guest
through the agent). The checksums each restored disk is compared with are taken on the host, from the
disk images themselves, while the guest is frozen inside the run's own freeze window (after its pull job
started, before its thaw): independent of the NBD export and the vault, and exactly the point the run
captured. Incrementals must read about what the guests wrote, not the disk size; restored domains must
boot, answer their agent and hold each file written up to their point and none written after it.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")
libvirt_qemu = pytest.importorskip("libvirt_qemu")

from libvirt_guests import GuestDomain, build_guest, make_data_disk  # noqa: E402

from conftest import blake3_file  # noqa: E402
from raksha.hypervisor.disks import domain_disks  # noqa: E402
from raksha.hypervisor.group_backup import GroupResult, backup_domains  # noqa: E402
from raksha.hypervisor.pull import FILESYSTEM  # noqa: E402
from raksha.hypervisor.restore import FILES, NEW_VM, RestoreRequest, restore  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.progress import ProgressEvent  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.format.naming import BackupId  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402

MIB = 1 << 20
DISK = "64M"
WRITE = 2 * MIB  # written on every disk of both guests before each incremental
RUNS = ("full", "inc1", "inc2")
STEPS = ("s0", "s1", "s2")  # s0 before the full run, s1 before inc1, s2 before inc2


def guest_bytes(path: str, fmt: str, scratch: Path) -> str:
    """blake3 of the disk as the guest sees it (qcow2 read through its whole backing chain)."""
    if fmt == "raw":
        return blake3_file(path)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:  # guests may be thawed (and hashed) in parallel
        flat = Path(tmp) / "flat.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, str(flat)], check=True)
        return blake3_file(flat)


class FrozenChecksums:
    """Hashes each domain's disks at the moment its run thaws it: frozen, its pull job already started."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, scratch: Path) -> None:
        self.scratch = scratch
        self.taken: dict[str, dict[str, str]] = {}
        self.errors: list[str] = []
        real_agent = libvirt_qemu.qemuAgentCommand
        real_thaw = libvirt.virDomain.fsThaw

        def capture(dom: Any) -> None:
            try:  # whatever happens here, the driver's thaw goes ahead
                status = json.loads(real_agent(dom, '{"execute": "guest-fsfreeze-status"}', 10, 0))["return"]
                if status != "frozen":
                    raise AssertionError(f"{dom.name()} is {status} at its thaw")
                dom.suspend()  # not even the agent moves while the images are read
                try:
                    self.taken[dom.name()] = {d.target: guest_bytes(d.path, d.format, self.scratch)
                                              for d in domain_disks(dom.XMLDesc(0))}
                finally:
                    dom.resume()
            except Exception as exc:  # reported by run()
                self.errors.append(f"{dom.name()}: {exc!r}")

        def agent(dom: Any, command: str, timeout: int, flags: int) -> Any:
            if json.loads(command).get("execute") == "guest-fsfreeze-thaw":
                capture(dom)
            return real_agent(dom, command, timeout, flags)

        def thaw(dom: Any, *args: Any, **kwargs: Any) -> Any:  # should the driver thaw through libvirt's API
            capture(dom)
            return real_thaw(dom, *args, **kwargs)

        monkeypatch.setattr(libvirt_qemu, "qemuAgentCommand", agent)
        monkeypatch.setattr(libvirt.virDomain, "fsThaw", thaw)

    def run(self, *args: Any, **kwargs: Any) -> tuple[GroupResult, dict[str, dict[str, str]]]:
        self.taken, self.errors = {}, []
        result = backup_domains(*args, **kwargs)
        assert not self.errors, self.errors
        return result, self.taken


def write_step(vm: GuestDomain, step: str) -> dict[str, str]:
    """Fresh random files on both disks; returns their sha256 as the guest computed it."""
    sums = {}
    for dev in ("vda", "vdb"):
        code, out = vm.exec(f"dd if=/dev/urandom of=/mnt/{dev}/{step}.bin bs=64k count={WRITE >> 16} 2>/dev/null"
                            f" && sync && sha256sum /mnt/{dev}/{step}.bin", timeout=120)
        assert code == 0, out
        sums[dev] = out.split()[0].decode()
    return sums


@pytest.mark.parametrize("strategy", ["pull", "snapshot"])
def test_two_guests_full_two_incrementals_every_point_restored_to_files_and_new_domains(
        conn: libvirt.virConnect, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str) -> None:
    guest = build_guest()
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    # The boot disks: overlays of one base image holding a little "system".
    system = tmp_path / "system"
    (system / "etc").mkdir(parents=True)
    (system / "etc" / "hostname").write_text("raksha-guest\n")
    (system / "boot.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    base = make_data_disk(tmp_path / "base.qcow2", DISK, seed_dir=system)
    disks: dict[str, list[tuple[Path, str]]] = {}
    for vm, data_fmt in (("a", "raw"), ("b", "qcow2")):
        boot = tmp_path / f"{vm}-vda.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(boot)],
                       check=True)
        disks[vm] = [(boot, "qcow2"), (make_data_disk(tmp_path / f"{vm}-vdb.{data_fmt}", DISK, fmt=data_fmt), data_fmt)]
    names = {"a": "raksha-app-a", "b": "raksha-app-b"}
    frozen = FrozenChecksums(monkeypatch, tmp_path)

    written: dict[str, dict[str, dict[str, str]]] = {}  # step -> guest -> disk -> sha256 of the file
    runs: dict[str, GroupResult] = {}
    checksums: dict[str, dict[str, dict[str, str]]] = {}  # run -> guest -> disk -> blake3 of the point
    with GuestDomain(conn, guest, disks["a"], tmp_path, name=names["a"]) as a, \
            GuestDomain(conn, guest, disks["b"], tmp_path, name=names["b"]) as b:
        a.wait_for_agent(timeout=240)
        b.wait_for_agent(timeout=240)
        guests = {"a": a, "b": b}
        parent = None
        for step, run in zip(STEPS, RUNS, strict=True):
            written[step] = {vm: write_step(g, step) for vm, g in guests.items()}
            runs[run], taken = frozen.run(conn, list(names.values()), vault, "app", run, parent_run=parent,
                                          strategy=strategy)
            checksums[run] = {vm: taken[name] for vm, name in names.items()}
            parent = run
        uuids = {vm: g.dom.UUIDString() for vm, g in guests.items() if g.dom is not None}

    # What each run recorded.
    figures = []
    for run, result in runs.items():
        assert {vm.name: vm.consistency for vm in result.vms} == {n: FILESYSTEM for n in names.values()}
        for vm in result.vms:
            for d in vm.disks:
                figures.append(f"{strategy} {run} {vm.name} {d.target}: {d.kind}, read {d.bytes_read / MIB:.2f} MiB "
                               f"({d.tracking})")
                if run == "full":
                    assert d.kind == "full"
                    continue
                # qcow2 disks always (a checkpoint bitmap, or the snapshot's overlay); the raw disk when its
                # run recorded it as tracked.
                if (vm.name, d.target) != (names["a"], "vdb"):
                    assert d.kind == "incremental", d
                if d.kind == "incremental":  # reads what the guest wrote (plus ext4's metadata), not 64 MiB
                    assert WRITE <= d.bytes_read <= 1.1 * WRITE + MIB, (run, vm.name, d)
        print(f"{strategy} {run}: freeze window {result.freeze_ms:.0f} ms")
    print("\n".join(figures))
    meta = vault.read_metadata(BackupId("app", "inc2", uuids["a"], "vda"))
    chain = json.loads(meta["hints"]["backing_chain"])
    assert [c["filename"] for c in chain] == [str(disks["a"][0][0]), str(base)]  # the shared base is noted
    assert json.loads(meta["hints"]["interfaces"]) == [] and meta["hints"]["bus"] == "virtio"

    # Every point to files: each disk bit-identical to what its guest held, frozen, at that point.
    for run in RUNS:
        out = tmp_path / f"files-{run}"
        out.mkdir()
        events: list[ProgressEvent] = []
        report = restore(None, vault, RestoreRequest("app", run, FILES, target_dir=out, fmt="raw"),
                         progress=events.append)
        assert events[-1].done == events[-1].total == report.bytes_written > 0
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [f"{n}-{t}.raw" for n in names.values() for t in ("vda", "vdb")]
            + [f"{n}.xml" for n in names.values()] + [f"{n}-interfaces.json" for n in names.values()])
        for vm in report.vms:
            key = next(k for k, n in names.items() if n == vm.source_name)
            for d in vm.disks:
                assert d.verified and d.chunks_verified > 0
                assert blake3_file(d.path) == checksums[run][key][d.target], (run, vm.source_name, d.target)
            assert f"<name>{vm.source_name}</name>" in Path(out / f"{vm.source_name}.xml").read_text()
        for p in out.iterdir():
            p.unlink()  # keep the disk use of the test down

    # Every point to new domains: bit-identical before they boot; they boot, answer their agent and hold
    # each file written up to their point and none after. The full run's come back with the boot disk only.
    for i, run in enumerate(RUNS):
        only = ["vda"] if run == "full" else None
        new = {vm: f"{name}-{run}" for vm, name in names.items()}
        out = tmp_path / f"vms-{run}"
        out.mkdir()
        report = restore(conn, vault, RestoreRequest("app", run, NEW_VM, disks=only, target_dir=out, fmt="qcow2",
                                                     names={uuids[vm]: n for vm, n in new.items()}, start=False))
        assert sorted(report.domains) == sorted(new.values())
        copies = [(next(k for k, n in names.items() if n == vm.source_name),
                   GuestDomain.attached(conn, conn.lookupByName(vm.domain), tmp_path)) for vm in report.vms]
        try:
            for vm, (key, copy) in zip(report.vms, copies, strict=True):
                assert vm.uuid not in (None, uuids[key]) and not vm.started
                assert [d.target for d in vm.disks] == (only or ["vda", "vdb"])
                for d in vm.disks:
                    assert d.verified and guest_bytes(d.path, "qcow2", tmp_path) == checksums[run][key][d.target]
                assert copy.dom is not None
                assert [d.target for d in domain_disks(copy.dom.XMLDesc(0))] == (only or ["vda", "vdb"])
                copy.dom.create()
            for key, copy in copies:
                copy.wait_for_agent(timeout=240)
                assert copy.agent("guest-ping") == {}
                for j, step in enumerate(STEPS):
                    for dev in only or ("vda", "vdb"):
                        code, out_ = copy.exec(f"sha256sum /mnt/{dev}/{step}.bin 2>/dev/null")
                        if j <= i:
                            assert code == 0 and out_.split()[0].decode() == written[step][key][dev], (run, dev, step)
                        else:
                            assert code != 0, f"{run}: {dev} holds {step}.bin, written after the point"
        finally:
            for _key, copy in copies:
                copy.__exit__(None, None, None)
            for p in out.iterdir():
                p.unlink()

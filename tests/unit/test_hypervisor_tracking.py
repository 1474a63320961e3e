"""Pure parts of the pull strategy: bitmap granularity, libvirt error translation, QEMU's user, work directories,
scratch images."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from raksha.domain.errors import HypervisorError, NotFound, VmGone  # noqa: E402
from raksha.hypervisor import pull  # noqa: E402
from raksha.hypervisor.disks import DiskInfo  # noqa: E402
from raksha.hypervisor.errors import translate  # noqa: E402
from raksha.hypervisor.pull import (  # noqa: E402
    _SOCKET_OWNER,
    MAX_BITMAP_BYTES,
    PULL_DIR_ENV,
    WORKDIR_PREFIX,
    DomainPoint,
    bitmap_granularity,
    make_workdir,
    qemu_owner,
)
from raksha.hypervisor.qemu_blocks import aliases  # noqa: E402

GIB, TIB = 1 << 30, 1 << 40


@pytest.mark.parametrize(("size", "granularity"), [
    (0, 4096), (2 * GIB, 4096), (TIB, 4096), (TIB + 1, 8192), (4 * TIB, 16384),
])
def test_granularity_is_4k_until_a_bitmap_would_pass_32_mib(size: int, granularity: int) -> None:
    assert bitmap_granularity(size) == granularity
    assert size / granularity / 8 <= MAX_BITMAP_BYTES


class FakeLibvirtError(libvirt.libvirtError):
    def __init__(self, code: int, message: str) -> None:
        Exception.__init__(self, message)
        self._code, self._message = code, message

    def get_error_code(self) -> int:
        return self._code

    def get_error_message(self) -> str:
        return self._message


@pytest.mark.parametrize(("code", "message", "kind", "stable_code", "retryable"), [
    (libvirt.VIR_ERR_NO_DOMAIN, "Domain not found", VmGone, "VM_GONE", True),
    (libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running", VmGone, "VM_GONE", True),
    (libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT, "no checkpoint", NotFound, "CHECKPOINT_NOT_FOUND", False),
    (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "checkpoint for disk vda unsupported for storage type raw",
     HypervisorError, "HYPERVISOR_UNSUPPORTED", False),
    (libvirt.VIR_ERR_OPERATION_INVALID, "another job is active", HypervisorError, "VM_BUSY", True),
    (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, "agent not connected", HypervisorError, "GUEST_AGENT_UNRESPONSIVE", True),
    (libvirt.VIR_ERR_INTERNAL_ERROR, "something", HypervisorError, "HYPERVISOR_ERROR", True),
])
def test_libvirt_errors_get_stable_codes(code: int, message: str, kind: type, stable_code: str,
                                         retryable: bool) -> None:
    err = translate(FakeLibvirtError(code, message), "vm1: backup")
    assert isinstance(err, kind) and err.code == stable_code and err.retryable is retryable
    assert err.message == f"vm1: backup: {message}"
    assert err.to_dict()["code"] == stable_code


def test_disk_aliases_from_the_live_xml() -> None:
    xml = """<domain><devices>
      <disk type='file' device='disk'><target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>
      <disk type='block' device='disk'><target dev='vdb' bus='virtio'/><alias name='virtio-disk1'/></disk>
      <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
    </devices></domain>"""
    assert aliases(xml) == {"vda": "virtio-disk0", "vdb": "virtio-disk1"}


@pytest.mark.parametrize(("label", "owner"), [
    ("+64055:+107", (64055, 107)),
    ("root:root", (0, 0)),
    ("nosuchuser:+1", None),
])
def test_qemu_s_user_from_libvirt_s_dac_label(label: str, owner: tuple[int, int] | None) -> None:
    xml = (f"<domain><seclabel type='dynamic' model='apparmor'><label>libvirt-x</label></seclabel>"
           f"<seclabel type='dynamic' model='dac' relabel='yes'><label>{label}</label></seclabel></domain>")
    assert qemu_owner(xml) == owner
    assert qemu_owner("<domain/>") is None


def test_work_directories_of_dead_runs_are_swept_and_live_ones_kept(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PULL_DIR_ENV, str(tmp_path))
    dead = tmp_path / f"{WORKDIR_PREFIX}{2 ** 22 + 7}-abc"  # past pid_max: no such process
    (dead / "uuid").mkdir(parents=True)
    (dead / "uuid" / "vda.scratch").write_bytes(b"guest data")
    other = tmp_path / "someone-else"
    other.mkdir()

    workdir = make_workdir()

    assert not dead.exists() and other.exists()
    assert os.path.dirname(workdir) == str(tmp_path) and stat.S_IMODE(os.stat(workdir).st_mode) == 0o711
    assert _SOCKET_OWNER.search(workdir).group(1) == str(os.getpid())
    assert make_workdir() != workdir and os.path.isdir(workdir)  # our own, alive, is kept


def test_an_unusable_pull_directory_is_a_permanent_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PULL_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(HypervisorError) as err:
        make_workdir()
    assert err.value.code == "PULL_DIR_UNUSABLE" and not err.value.retryable and PULL_DIR_ENV in str(err.value)


class _Named:
    def __init__(self, name: str) -> None:
        self._name = name

    def name(self) -> str:
        return self._name


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is installed by scripts/setup.sh")
def test_scratch_images_after_the_first_are_qemu_img_s_bytes_without_qemu_img(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first run of a process asks qemu-img for each size; later ones write what it made, byte for byte."""
    monkeypatch.setattr(pull, "_SCRATCH_TEMPLATES", {})
    size = 3 * GIB + 65536
    vda = DiskInfo(target="vda", path="/images/a.qcow2", source_type="file", format="qcow2", bus="virtio",
                   device="disk")
    point = DomainPoint(_Named("vm"), [vda], str(tmp_path / "nbd.sock"), "c1", None)
    point.plan(vda).size = size

    first, second = tmp_path / "first", tmp_path / "second"
    for d in (first, second):
        d.mkdir()
    procs = pull._start_scratch(point, str(first))
    assert [type(p) for p in procs] == [subprocess.Popen]
    pull._finish_scratch(point, procs, str(first))
    assert point.scratch_made and size in pull._SCRATCH_TEMPLATES

    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", None)  # qemu-img is not run again
        procs = pull._start_scratch(point, str(second))
    assert procs == [None]
    pull._finish_scratch(point, procs, str(second))
    made = second / "vda.scratch"
    assert point.scratch_made and stat.S_IMODE(made.stat().st_mode) == 0o600
    assert made.read_bytes() == (first / "vda.scratch").read_bytes()
    info = subprocess.run(["qemu-img", "info", "--output=json", str(made)], capture_output=True, text=True, check=True)
    assert f'"virtual-size": {size}' in info.stdout and '"format": "qcow2"' in info.stdout
    subprocess.run(["qemu-img", "check", "-q", str(made)], check=True)


def test_the_checkpoint_waits_for_the_reads_only_where_every_qcow2_disk_has_the_runs_bitmap(tmp_path: Path) -> None:
    """ADR 0025/0028: made beside the reads, a checkpoint is libvirt taking the run's own bitmaps, added before
    the point in time; a qcow2 disk without one needs libvirt's checkpoint before the window. A domain of raw
    disks makes none."""
    def disk(target: str, fmt: str) -> DiskInfo:
        return DiskInfo(target=target, path=f"/images/{target}.{fmt}", source_type="file", format=fmt, bus="virtio",
                        device="disk")

    vda, vdb, vdc = disk("vda", "qcow2"), disk("vdb", "raw"), disk("vdc", "qcow2")
    point = DomainPoint(_Named("vm"), [vda, vdb, vdc], str(tmp_path / "nbd.sock"), "c1", None)
    point.plan(vdb).added = True  # a raw disk's own bitmap: no checkpoint tracks it
    assert not pull._checkpoint_after(point)
    point.plan(vda).added = True
    assert not pull._checkpoint_after(point)  # vdc's is missing
    point.plan(vdc).added = True
    assert pull._checkpoint_after(point)
    raw_only = DomainPoint(_Named("vm"), [vdb], str(tmp_path / "nbd.sock"), "c1", None)
    raw_only.plan(vdb).added = True
    assert not pull._checkpoint_after(raw_only) and pull._checkpoint_xml("c1", raw_only) is None


def test_a_checkpoint_made_beside_the_reads_names_the_runs_bitmaps_and_its_parent_if_there(tmp_path: Path) -> None:
    """The redefinition libvirt is asked for (ADR 0028): each qcow2 disk's bitmap is the one the run added,
    named as the run; raw and excluded disks are not in it; the parent only when the domain has it."""
    def disk(target: str, fmt: str) -> DiskInfo:
        return DiskInfo(target=target, path=f"/images/{target}.{fmt}", source_type="file", format=fmt, bus="virtio",
                        device="disk")

    point = DomainPoint(_Named("vm"), [disk("vda", "qcow2"), disk("vdb", "raw")], str(tmp_path / "nbd.sock"),
                        "run2", None, excluded=[disk("vdc", "qcow2")], parent="run1")
    point.checkpoints = {"run1"}
    root = ET.fromstring(pull._redefine_xml(point))
    assert root.findtext("name") == "run2" and root.findtext("parent/name") == "run1"
    assert int(root.findtext("creationTime") or 0) > 0
    assert {d.get("name"): (d.get("checkpoint"), d.get("bitmap")) for d in root.iter("disk")} == {
        "vda": ("bitmap", "run2"), "vdb": ("no", None), "vdc": ("no", None)}
    point.checkpoints = set()  # the parent's checkpoint is gone: the run's has none
    assert ET.fromstring(pull._redefine_xml(point)).find("parent") is None

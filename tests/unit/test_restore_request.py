"""The driver's restore API without a hypervisor: restores to files, the selections, progress, verification,
and the errors a request is refused with before anything is written (libvirt stood in for where needed)."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path
from typing import Any

import libvirt
import pytest

from conftest import blake3_file, chunk_image, random_chunk
from raksha.domain.errors import AlreadyExists, ChunkMissing, InvalidInput, NotFound, RakshaError, VaultCorrupt
from raksha.hypervisor.restore import (
    FILES,
    IN_PLACE,
    NEW_VM,
    RestoreRequest,
    restore,
    translate_libvirt_error,
)
from raksha.vault.backends.memory import MemoryBackend
from raksha.vault.engine.backup import backup_disk
from raksha.vault.engine.progress import ProgressEvent
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault
from raksha.vault.sources.open import open_source

K64 = 64 << 10
UUID_A, UUID_B = "11111111-2222-3333-4444-555555555555", "66666666-7777-8888-9999-000000000000"


def saved_xml(name: str, uuid: str) -> str:
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><devices>"
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/vda.qcow2'/>"
            "<target dev='vda' bus='virtio'/></disk>"
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/img/vdb.raw'/>"
            "<target dev='vdb' bus='virtio'/></disk>"
            "<interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>"
            "</devices></domain>")


@pytest.fixture
def point(tmp_path: Path) -> tuple[Vault, dict[str, Path]]:
    """Run job/r1 of two VMs (app1: vda + vdb, app2: vda), saved as backup_domains saves them."""
    vault = Vault.init(MemoryBackend(), VaultConfig.new(chunk_size=K64))
    images: dict[str, Path] = {}
    for vm, uuid, targets in (("app1", UUID_A, ("vda", "vdb")), ("app2", UUID_B, ("vda",))):
        interfaces = json.dumps([{"type": "network", "mac": "52:54:00:aa:bb:cc", "source": "default", "model": ""}])
        for n, target in enumerate(targets):
            seed = 10 * len(images)
            img = chunk_image(tmp_path / f"{vm}-{target}.src",
                              [random_chunk(seed), None, random_chunk(seed + 1), random_chunk(seed)] + [None] * 4)
            images[f"{vm}/{target}"] = img
            source = open_source(str(img))
            try:
                backup_disk(vault, source, BackupId("job", "r1", uuid, target),
                            hints={"vm_name": vm, "consistency": "crash", "domain_xml": saved_xml(vm, uuid),
                                   "interfaces": interfaces, "disk_format": "qcow2" if n == 0 else "raw"})
            finally:
                source.close()
    return vault, images


def test_files_writes_every_disk_verified_with_the_definition_beside_it(point: tuple[Vault, dict[str, Path]],
                                                                        tmp_path: Path) -> None:
    vault, images = point
    out = tmp_path / "out"
    out.mkdir()
    events: list[ProgressEvent] = []
    report = restore(None, vault, RestoreRequest("job", "r1", FILES, target_dir=out, fmt="raw"),
                     progress=events.append)
    assert report.type == FILES and report.domains == []
    assert sorted(os.listdir(out)) == ["app1-interfaces.json", "app1-vda.raw", "app1-vdb.raw", "app1.xml",
                                       "app2-interfaces.json", "app2-vda.raw", "app2.xml"]
    for vm in report.vms:
        for disk in vm.disks:
            assert blake3_file(disk.path) == blake3_file(images[f"{vm.source_name}/{disk.target}"])
            # 3 stored chunks, 2 distinct (the first repeats); each hashed against its id while restoring
            assert disk.verified and disk.chunks == disk.chunks_verified == 2
            assert disk.virtual_size == 8 * K64 and disk.bytes_written == 3 * K64
    assert (out / "app1.xml").read_text() == saved_xml("app1", UUID_A)
    assert json.loads((out / "app1-interfaces.json").read_text())[0]["mac"] == "52:54:00:aa:bb:cc"
    assert set(report.paths) == {str(out / f) for f in os.listdir(out)}
    assert report.bytes_written == 9 * K64
    # Progress: one meter over every disk, never backwards, ending at the total.
    assert events and events[-1].phase == "restore"
    assert events[-1].done == events[-1].total == 9 * K64
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert report.to_dict()["vms"][0]["disks"][0]["verified"] is True


def test_files_restores_only_the_selected_vm_and_disk_as_qcow2(point: tuple[Vault, dict[str, Path]],
                                                               tmp_path: Path) -> None:
    vault, images = point
    report = restore(None, vault, RestoreRequest("job", "r1", FILES, vms=[UUID_A], disks=["vdb"],
                                                 target_dir=tmp_path, fmt="qcow2"))
    (vm,) = report.vms
    assert vm.source_name == "app1" and [d.target for d in vm.disks] == ["vdb"]
    assert vm.disks[0].path == str(tmp_path / "app1-vdb.qcow2")
    assert not (tmp_path / "app1-vda.qcow2").exists() and not (tmp_path / "app2-vda.qcow2").exists()
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", vm.disks[0].path, str(flat)], check=True)
    assert blake3_file(flat) == blake3_file(images["app1/vdb"]) and vm.disks[0].verified


@pytest.mark.parametrize("change, code, cls", [
    ({"run": "r9"}, "BACKUP_NOT_FOUND", NotFound),
    ({"vms": ["app3"]}, "VM_NOT_IN_BACKUP", NotFound),
    ({"vms": ["app2"], "disks": ["vdb"]}, "DISK_NOT_IN_BACKUP", NotFound),
    ({"disks": ["vdb"]}, "DISK_NOT_IN_BACKUP", NotFound),  # app2 has no vdb
    ({"disks": []}, "INVALID_INPUT", InvalidInput),
    ({"type": "somewhere"}, "RESTORE_TYPE_INVALID", InvalidInput),
    ({"fmt": "vmdk"}, "INVALID_FORMAT", InvalidInput),
    ({"target_dir": None}, "TARGET_DIR_REQUIRED", InvalidInput),
    ({"target_dir": "missing"}, "TARGET_DIR_NOT_FOUND", NotFound),
    ({"target_dir": "afile"}, "TARGET_DIR_INVALID", InvalidInput),
    ({"type": NEW_VM}, "INVALID_INPUT", InvalidInput),  # no libvirt connection
])
def test_a_bad_request_is_refused_with_a_stable_code_before_anything_is_written(
        point: tuple[Vault, dict[str, Path]], tmp_path: Path, change: dict[str, Any], code: str,
        cls: type[RakshaError]) -> None:
    vault, _ = point
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "afile").write_text("")
    args: dict[str, Any] = {"job": "job", "run": "r1", "type": FILES, "target_dir": out, "fmt": "raw"}
    args.update(change)
    if isinstance(args["target_dir"], str):
        args["target_dir"] = tmp_path / args["target_dir"]
    with pytest.raises(cls) as err:
        restore(None, vault, RestoreRequest(**args))
    assert err.value.code == code
    assert os.listdir(out) == []


def test_an_existing_file_in_the_way_stops_the_whole_restore(point: tuple[Vault, dict[str, Path]],
                                                              tmp_path: Path) -> None:
    vault, _ = point
    (tmp_path / "app2.xml").write_text("mine")
    with pytest.raises(AlreadyExists) as err:
        restore(None, vault, RestoreRequest("job", "r1", FILES, target_dir=tmp_path, fmt="raw"))
    assert err.value.code == "OUTPUT_EXISTS" and str(tmp_path / "app2.xml") in err.value.details["paths"]
    assert not (tmp_path / "app1-vda.raw").exists()  # nothing was written, not even the first VM's disks
    assert (tmp_path / "app2.xml").read_text() == "mine"


def test_a_vm_that_fails_halfway_leaves_none_of_its_files_and_the_error_says_what_was_done(
        point: tuple[Vault, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vault, _ = point
    from raksha.hypervisor import restore as module

    real = module.restore_backup

    def failing(vault: Vault, bid: BackupId, output: str, **kwargs: Any) -> Any:
        if bid.vm == UUID_A and bid.resource == "vdb":
            raise ChunkMissing("gone", backup=str(bid))
        return real(vault, bid, output, **kwargs)

    monkeypatch.setattr(module, "restore_backup", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ChunkMissing) as err:
        restore(None, vault, RestoreRequest("job", "r1", FILES, vms=["app2", "app1"], target_dir=out, fmt="raw"))
    assert err.value.details["failed_vm"] == UUID_A
    assert [vm["source_name"] for vm in err.value.details["restored"]] == ["app2"]
    assert sorted(os.listdir(out)) == ["app2-interfaces.json", "app2-vda.raw", "app2.xml"]  # none of app1's


def test_a_disk_not_verified_chunk_by_chunk_is_never_reported(
        point: tuple[Vault, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vault, _ = point
    from raksha.hypervisor import restore as module

    real = module.restore_backup

    def short(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        result.chunks_verified -= 1  # as if one chunk had been written without its hash checked
        return result

    monkeypatch.setattr(module, "restore_backup", short)
    with pytest.raises(VaultCorrupt) as err:
        restore(None, vault, RestoreRequest("job", "r1", FILES, vms=["app2"], target_dir=tmp_path, fmt="raw"))
    assert err.value.code == "RESTORE_UNVERIFIED" and not (tmp_path / "app2-vda.raw").exists()


def test_a_target_dir_that_cannot_be_written_is_named(point: tuple[Vault, dict[str, Path]], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    vault, _ = point

    def read_only(*_a: Any, **_k: Any) -> Any:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("raksha.hypervisor.restore.tempfile.mkstemp", read_only)
    with pytest.raises(InvalidInput) as err:
        restore(None, vault, RestoreRequest("job", "r1", FILES, target_dir=tmp_path))
    assert err.value.code == "TARGET_DIR_NOT_WRITABLE" and "Read-only" in err.value.message


def libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, 0, message, 0, "", None, None, 0, 0)
    return exc


class FakeConn:
    """Just enough of a libvirt connection for the checks made before anything is written."""

    def __init__(self, names: set[str] = frozenset(), uuids: dict[str, Any] | None = None,  # type: ignore[assignment]
                 qemu: str = "+0:+0") -> None:
        self.names = names
        self.uuids = uuids or {}
        self.defined: list[str] = []
        self.qemu = qemu  # the DAC label QEMU runs with

    def getCapabilities(self) -> str:
        return ("<capabilities><host><secmodel><model>none</model></secmodel><secmodel><model>dac</model>"
                f"<baselabel type='kvm'>{self.qemu}</baselabel><baselabel type='qemu'>{self.qemu}</baselabel>"
                "</secmodel></host></capabilities>")

    def lookupByName(self, name: str) -> object:
        if name in self.names:
            return object()
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: no domain with matching name '{name}'")

    def lookupByUUIDString(self, uuid: str) -> Any:
        if uuid in self.uuids:
            return self.uuids[uuid]
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: no domain with matching uuid '{uuid}'")

    def defineXML(self, xml: str) -> Any:
        self.defined.append(xml)
        raise libvirt_error(libvirt.VIR_ERR_XML_DETAIL, "unsupported configuration: what a domain")


def test_new_vm_refuses_a_taken_name_before_writing(point: tuple[Vault, dict[str, Path]], tmp_path: Path) -> None:
    vault, _ = point
    out = tmp_path / "out"
    out.mkdir()
    conn: Any = FakeConn({"app1-r1"})
    with pytest.raises(AlreadyExists) as err:
        restore(conn, vault, RestoreRequest("job", "r1", NEW_VM, target_dir=out))
    assert err.value.code == "DOMAIN_EXISTS" and "app1-r1" in err.value.message
    with pytest.raises(InvalidInput) as err2:
        restore(FakeConn(), vault, RestoreRequest("job", "r1", NEW_VM, target_dir=out,  # type: ignore[arg-type]
                                                  names={"app1": "same", UUID_B: "same"}))
    assert err2.value.code == "DOMAIN_NAME_COLLISION"
    assert os.listdir(out) == []


def test_new_vm_that_libvirt_refuses_leaves_no_images_and_says_why(point: tuple[Vault, dict[str, Path]],
                                                                    tmp_path: Path) -> None:
    vault, _ = point
    conn = FakeConn()
    with pytest.raises(InvalidInput) as err:
        restore(conn, vault, RestoreRequest("job", "r1", NEW_VM, vms=["app2"], names={"app2": "copy"},  # type: ignore[arg-type]
                                            target_dir=tmp_path, fmt="raw"))
    assert err.value.code == "DOMAIN_XML_INVALID" and err.value.details["libvirt_code"] == libvirt.VIR_ERR_XML_DETAIL
    assert err.value.details["failed_vm"] == UUID_B and err.value.details["restored"] == []
    assert "<name>copy</name>" in conn.defined[0] and "52:54:00:aa:bb:cc" not in conn.defined[0]
    assert not (tmp_path / "copy-vda.raw").exists()  # rolled back: a retry starts clean


def test_new_vm_refuses_a_directory_qemu_may_not_pass_before_writing(point: tuple[Vault, dict[str, Path]],
                                                                     tmp_path: Path) -> None:
    vault, _ = point
    tmp_path.chmod(0o711)
    out = tmp_path / "private"
    out.mkdir(mode=0o700)
    nobody = pwd.getpwnam("nobody")
    conn: Any = FakeConn(qemu=f"+{nobody.pw_uid}:+{nobody.pw_gid}")
    with pytest.raises(InvalidInput) as err:
        restore(conn, vault, RestoreRequest("job", "r1", NEW_VM, target_dir=out))
    assert err.value.code == "TARGET_DIR_UNREACHABLE" and err.value.details["blocked"] == str(out)
    assert f"uid {nobody.pw_uid}" in err.value.message and "chmod o+x" in err.value.message
    assert os.listdir(out) == [] and conn.defined == []
    out.chmod(0o701)  # passing is enough: libvirt gives the images themselves to QEMU's user
    with pytest.raises(InvalidInput) as err:
        restore(conn, vault, RestoreRequest("job", "r1", NEW_VM, target_dir=out))
    assert err.value.code == "DOMAIN_XML_INVALID"  # got as far as defining the domain


def test_in_place_needs_the_domain(point: tuple[Vault, dict[str, Path]]) -> None:
    vault, _ = point
    with pytest.raises(NotFound) as err:
        restore(FakeConn(), vault, RestoreRequest("job", "r1", IN_PLACE, vms=["app1"]))  # type: ignore[arg-type]
    assert err.value.code == "VM_NOT_FOUND" and UUID_A in err.value.message


@pytest.mark.parametrize("code, expected, retryable", [
    (libvirt.VIR_ERR_NO_DOMAIN, "VM_NOT_FOUND", False),
    (libvirt.VIR_ERR_DOM_EXIST, "DOMAIN_EXISTS", False),
    (libvirt.VIR_ERR_XML_ERROR, "DOMAIN_XML_INVALID", False),
    (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "HYPERVISOR_UNSUPPORTED", False),
    (libvirt.VIR_ERR_INTERNAL_ERROR, "HYPERVISOR_ERROR", True),
])
def test_libvirt_errors_get_stable_codes(code: int, expected: str, retryable: bool) -> None:
    err = translate_libvirt_error(libvirt_error(code, "boom"), "doing it")
    assert err.code == expected and err.retryable is retryable and err.message == "doing it: boom"
    assert err.details["libvirt_code"] == code
